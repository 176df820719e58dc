"""CIRCO test-server files: write one from a model's rankings, and check one offline.

The server (https://circo.micc.unifi.it) takes one JSON object: every query id of the test split as a string key,
each mapped to the top 50 retrieved COCO image ids, integers, unique within the list::

    {"0": [9761, 489535, ...50 ids], "1": [...], ..., "799": [...]}

:func:`predict_test` ranks the test queries over the whole gallery (the reference kept in it, as the benchmark's
own evaluation ranks; ``exclude_reference=True`` leaves it out), :func:`write_submission` writes the file and
:func:`validate_submission` lists every problem of a file against the test annotations.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from offset_cir import io
from offset_cir.errors import UserInputError
from offset_cir.eval.cirr_submission import Problems

log = logging.getLogger(__name__)

TOP = 50
FILE_NAME = "circo_{split}_submission.json"


def predict_test(model, bench, split: str = "test", batch_size: int = 32, num_workers: int = 0, device=None,
                 progress: bool = True, gallery_cache=None, exclude_reference: bool = False) -> dict[str, list[int]]:
    """The top 50 gallery ids (integers) of every query of ``split``, keyed by its query id as a string."""
    from offset_cir.eval.evaluate import Encoder, evaluation_mode, rank_unit

    split = bench.canonical_split(split)
    (es,) = bench.eval_sets(split)
    with evaluation_mode(model):
        enc = Encoder(model, bench, batch_size, num_workers, device, progress, cache=gallery_cache)
        ranked = rank_unit(enc, es, ("all",), top_k=TOP, need_top=True, exclude_reference=exclude_reference)
    short = [q.pairid for q, ids in zip(es.queries, ranked.top["all"]) if len(ids) < TOP]
    if short:
        raise UserInputError(f"{bench.name} {split}: the gallery holds fewer than {TOP} candidates for queries "
                             f"{short[:5]}; the server wants {TOP} ids per query")
    return {str(q.pairid): [int(i) for i in ids] for q, ids in zip(es.queries, ranked.top["all"])}


def write_submission(predictions: dict[str, list[int]], out_dir, split: str = "test") -> Path:
    """Write the server's file into ``out_dir``; returns its path."""
    path = Path(out_dir) / FILE_NAME.format(split=split)
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_text(path, json.dumps(predictions))
    log.info("wrote %s (%d queries)", path, len(predictions))
    return path


def _check_list(p: Problems, key: str, ids, gallery: set[str] | None) -> None:
    if not isinstance(ids, list):
        p.add("not a list", f"query {key}: value is a JSON {type(ids).__name__}, expected a list of {TOP} image ids")
        return
    if len(ids) != TOP:
        p.add("length", f"query {key}: {len(ids)} image ids, expected exactly {TOP}")
    wrong = [x for x in ids if isinstance(x, bool) or not isinstance(x, int)]
    if wrong:
        kinds = sorted({type(x).__name__ for x in wrong})
        p.add("not an integer", f"query {key}: {len(wrong)} image id(s) are JSON {'/'.join(kinds)} (first: "
                                f"{wrong[0]!r}), expected integers (the COCO id, e.g. 243611)")
    seen: set = set()
    for x in ids:
        if isinstance(x, bool) or not isinstance(x, int):
            continue
        if x in seen:
            p.add("duplicate", f"query {key}: image id {x} listed twice (the {TOP} ids must be unique)")
        seen.add(x)
        if gallery is not None and str(x) not in gallery:
            p.add("not in gallery", f"query {key}: image id {x} is not a COCO 2017 unlabeled image of this copy")


def validate_submission(path, bench, split: str = "test", limit: int = 20, check_gallery: bool = False) -> list[str]:
    """Every problem of a submission file (empty list: the file passes). ``bench`` is a CIRCO benchmark holding the
    split's annotations; ``check_gallery``: also require every id to be an image of ``bench``'s gallery."""
    path = Path(path)
    p = Problems(limit)
    if not path.is_file():
        return [f"{path}: file not found"]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"not valid JSON: {exc}"]
    if not isinstance(data, dict):
        return [f"top level is a JSON {type(data).__name__}, expected an object of query id -> {TOP} image ids"]
    split = bench.canonical_split(split)
    wanted = [str(q.pairid) for q in bench.queries(split)]
    for qid in wanted:
        if qid not in data:
            p.add("missing query", f"query {qid}: missing (every {split} query id must be a key)")
    known = set(wanted)
    gallery = set(bench.gallery()) if check_gallery else None
    for key, ids in data.items():
        if key not in known:
            p.add("unknown query", f"key {key!r}: not a {split} query id (expected \"0\" to \"{len(wanted) - 1}\")")
            continue
        _check_list(p, key, ids, gallery)
    return p.lines()
