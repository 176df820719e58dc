"""CIRR test-server files (docs/model.md#evaluation; ``Test-split_server.md`` of the CIRR release).

Two JSON objects, one per metric::

    {"version": "rc2", "metric": "recall",        "<pairid>": [50 image names], ...}
    {"version": "rc2", "metric": "recall_subset", "<pairid>": [3 names from the query's set members], ...}

Every test1 pair id present and no other; the reference never listed; each file under 5 MB.
:func:`predict_test` ranks the test queries, :func:`write_submission` writes the two files and
:func:`validate_submission` checks a file offline against the test1 annotations.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from offset_cir import io
from offset_cir.errors import UserInputError

log = logging.getLogger(__name__)

MAX_BYTES = 5_000_000
SIZES = {"recall": 50, "recall_subset": 3}
FILE_NAMES = {"recall": "{split}_pred_ranks_recall.json", "recall_subset": "{split}_pred_ranks_recall_subset.json"}


def predict_test(model, bench, split: str = "test1", batch_size: int = 32, num_workers: int = 0, device=None,
                 progress: bool = True) -> dict[str, dict[str, list[str]]]:
    """Top-50 over the split's gallery and top-3 over the set members (reference excluded) per pair id:
    ``{"recall": {pairid: [...]}, "recall_subset": {pairid: [...]}}``."""
    from offset_cir.eval.evaluate import Encoder, evaluation_mode, rank_unit

    split = bench.canonical_split(split)
    (es,) = bench.eval_sets(split)
    if any(q.pairid is None for q in es.queries):
        raise UserInputError(f"{bench.name} {split}: queries without pairid cannot be submitted")
    with evaluation_mode(model):
        enc = Encoder(model, bench, batch_size, num_workers, device, progress)
        ranked = rank_unit(enc, es, ("all",), top_k=SIZES["recall"], subset=True,
                           subset_k=SIZES["recall_subset"], need_top=True)
    recall = {str(q.pairid): ids for q, ids in zip(es.queries, ranked.top["all"])}
    subset = {str(q.pairid): ids for q, ids in zip(es.queries, ranked.subset_top)}
    return {"recall": recall, "recall_subset": subset}


def write_submission(predictions: dict[str, dict[str, list[str]]], out_dir, split: str = "test1",
                     version: str = "rc2") -> dict[str, Path]:
    """Write one file per metric into ``out_dir``; returns metric -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for metric, table in predictions.items():
        body = {"version": version, "metric": metric, **table}
        path = out_dir / FILE_NAMES[metric].format(split=split)
        io.write_text(path, json.dumps(body))
        paths[metric] = path
        log.info("wrote %s (%d pair ids, %.2f MB)", path, len(table), path.stat().st_size / 1e6)
    return paths


class Problems:
    """Problems grouped by kind; each kind keeps its first ``limit`` examples and a total."""

    def __init__(self, limit: int = 20):
        self.limit = limit
        self.kinds: dict[str, list[str]] = defaultdict(list)
        self.totals: dict[str, int] = defaultdict(int)

    def add(self, kind: str, message: str) -> None:
        self.totals[kind] += 1
        if len(self.kinds[kind]) < self.limit:
            self.kinds[kind].append(message)

    def lines(self) -> list[str]:
        out = []
        for kind, msgs in self.kinds.items():
            out.extend(msgs)
            more = self.totals[kind] - len(msgs)
            if more > 0:
                out.append(f"... and {more} more: {kind}")
        return out


def validate_submission(path, bench, split: str = "test1", version: str = "rc2", metric: str | None = None,
                        limit: int = 20) -> list[str]:
    """Every problem of a submission file (empty list: the file passes). ``bench`` is a CIRR benchmark
    holding the split's annotations; ``metric`` forces the expected metric (default: the file's own)."""
    path = Path(path)
    p = Problems(limit)
    if not path.is_file():
        return [f"{path}: file not found"]
    size = path.stat().st_size
    if size >= MAX_BYTES:
        p.add("size", f"file is {size:,} bytes; the server accepts files under 5 MB ({MAX_BYTES:,} bytes)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return p.lines() + [f"not valid JSON: {exc}"]
    if not isinstance(data, dict):
        return p.lines() + [f"top level is a JSON {type(data).__name__}, expected an object of pairid -> names"]
    if "version" not in data:
        p.add("version", 'missing key "version" (expected "version": "%s")' % version)
    elif data["version"] != version:
        p.add("version", f'"version" is {data["version"]!r}, expected {version!r}')
    file_metric = data.get("metric")
    if "metric" not in data:
        p.add("metric", 'missing key "metric" (expected "recall" or "recall_subset")')
    elif file_metric not in SIZES:
        p.add("metric", f'"metric" is {file_metric!r}, expected "recall" or "recall_subset"')
    elif metric is not None and file_metric != metric:
        p.add("metric", f'"metric" is {file_metric!r}, expected {metric!r}')
    want_metric = metric or (file_metric if file_metric in SIZES else None)

    split = bench.canonical_split(split)
    queries = {str(q.pairid): q for q in bench.queries(split)}
    gallery = set(bench.image_table(split))
    keys = [k for k in data if k not in ("version", "metric")]
    for pid in sorted(set(queries) - set(keys), key=_num):
        p.add("missing pairid", f"pairid {pid}: missing (every {split} pair id must be present)")
    for k in keys:
        if k not in queries:
            p.add("unknown pairid", f"pairid {k}: not a {split} pair id")
    for k in keys:
        q = queries.get(k)
        names = data[k]
        if q is None:
            continue
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            p.add("not a list", f"pairid {k}: value must be a list of image names")
            continue
        if want_metric is not None and len(names) != SIZES[want_metric]:
            p.add("length", f"pairid {k}: {len(names)} names, expected {SIZES[want_metric]} for {want_metric}")
        seen = set()
        for n in names:
            if n in seen:
                p.add("duplicate", f"pairid {k}: name {n} listed twice")
            seen.add(n)
            if n == q.reference:
                p.add("reference", f"pairid {k}: lists its reference image {n} (the reference is never a candidate)")
            elif want_metric == "recall_subset" and n not in q.members:
                p.add("not in set", f"pairid {k}: name {n} is not in the query's image set")
            elif n not in gallery:
                p.add("not in gallery", f"pairid {k}: name {n} is not a {split} image")
    return p.lines()


def _num(s: str):
    return (0, int(s)) if s.isdigit() else (1, s)
