"""A mask run split over processes: which part is whose, what each leaves behind, and the one merged summary.

``offset masks --shard i/N`` (or N processes under ``torchrun``, shard = rank / world size) runs part ``i`` of the
plan: the plan's consecutive blocks of ``batch_size`` images, block ``b`` to shard ``b % N``
(:func:`offset_cir.masks.pipeline.batches_of`). Every batch is then the one a single process would run, so the
masks are byte for byte a single process's; the shards share nothing but the read-only plan, so they may run on
one machine or several, at once or one after another, each resumable as a single run is.

Each shard leaves, in ``<captions folder>/segmask-shards/``:

- ``captions-<i>-of-<N>.json``: the captions it used (a shard never writes the shared captions file);
- ``report-<i>-of-<N>.json``: its counts and failures, and the plan's fingerprint.

The shard that finds every report of its plan present merges them (:func:`merge`): the captions of all shards
into the shared captions file, the counts into ``summary.json`` and one summary printed. Merging twice gives the
same files, so two shards finishing together do no harm.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from offset_cir import io
from offset_cir.errors import UserInputError
from offset_cir.masks.records import MaskReport, read_captions, write_json_atomic
from offset_cir.hashing import bytes_sha256

logger = logging.getLogger(__name__)

SHARD_FOLDER = "segmask-shards"
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` (0-based); ``Shard()`` is the whole plan."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise UserInputError(f"--shard {self.index}/{self.count}: expected i/N with 0 <= i < N")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"i/N"`` as ``--shard`` takes it."""
        m = _SPEC.match(str(text))
        if not m:
            raise UserInputError(f"--shard {text!r}: expected i/N, e.g. 0/4 for the first of four parts")
        return cls(int(m.group(1)), int(m.group(2)))

    @classmethod
    def from_torchrun(cls) -> "Shard | None":
        """This process's shard under ``torchrun`` (``RANK`` / ``WORLD_SIZE``); None outside it."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world) if world > 1 else None

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_folder(captions_out: str | os.PathLike) -> Path:
    return Path(captions_out).parent / SHARD_FOLDER


def shard_captions_file(captions_out: str | os.PathLike, shard: Shard) -> Path:
    return shard_folder(captions_out) / f"captions-{shard.index}-of-{shard.count}.json"


def report_file(captions_out: str | os.PathLike, shard: Shard) -> Path:
    return shard_folder(captions_out) / f"report-{shard.index}-of-{shard.count}.json"


def plan_fingerprint(jobs: Sequence, batch_size: int) -> str:
    """What the shards must agree on: the plan's images and masks, in order, and the batch size."""
    blob = json.dumps([int(batch_size), [[str(j.image), str(j.mask)] for j in jobs]], separators=(",", ":"))
    return bytes_sha256(blob.encode("utf-8"))


def write_report(report, captions_out, shard: Shard, fingerprint: str) -> Path:
    """Leave this shard's counts and failures for the merge."""
    path = report_file(captions_out, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_json(path, {"shard": str(shard), "plan": fingerprint, **asdict(report)})
    return path


def merge(captions_out, count: int, fingerprint: str):
    """The merged report of all ``count`` shards of the plan ``fingerprint`` (captions merged into
    ``captions_out`` and the counts into ``summary.json``), or None while a shard's report is missing."""
    reports = []
    for i in range(count):
        path = report_file(captions_out, Shard(i, count))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if data.get("plan") != fingerprint:
            return None  # a report of another plan (other images, batch size or N): that shard has not run this one
        reports.append(data)
    captions: dict[str, str] = {}
    for path in [Path(captions_out)] + [shard_captions_file(captions_out, Shard(i, count)) for i in range(count)]:
        if path.is_file():
            captions.update(read_captions(path))
    merged = MaskReport(total=sum(r["total"] for r in reports), written=sum(r["written"] for r in reports),
                        skipped=sum(r["skipped"] for r in reports),
                        failed=[tuple(f) for r in reports for f in r["failed"]],
                        seconds=max(r["seconds"] for r in reports))
    if captions:
        write_json_atomic(Path(captions_out), captions)
        merged.captions_file = str(captions_out)
    io.write_json(shard_folder(captions_out) / "summary.json", {"shards": count, "plan": fingerprint,
                                                                **asdict(merged)})
    return merged
