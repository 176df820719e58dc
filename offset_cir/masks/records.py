"""The record of a mask run: its counts and failures (``MaskReport``), and the captions file it keeps.

The pipeline (:mod:`offset_cir.masks.pipeline`) fills a report per process; the shards' merge
(:mod:`offset_cir.masks.shards`) adds them up. Both read and write the captions file here.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offset_cir import io
from offset_cir.errors import UserInputError

__all__ = ["MaskReport", "read_captions", "write_json_atomic"]


@dataclass
class MaskReport:
    total: int = 0
    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    captions_file: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self, limit: int = 50) -> str:
        lines = [f"masks: {self.total} images, {self.written} written, {self.skipped} skipped (already valid), "
                 f"{len(self.failed)} failed, {self.seconds:.1f} s"]
        for path, reason in self.failed[:limit]:
            lines.append(f"  failed: {path}: {reason}")
        if len(self.failed) > limit:
            lines.append(f"  ... and {len(self.failed) - limit} more failures")
        if self.captions_file:
            lines.append(f"captions used: {self.captions_file}")
        return "\n".join(lines)


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """A JSON object name -> caption (names: relative path, file name or stem of an image)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UserInputError(f"--captions {path}: file not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"--captions {path}: not a readable JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise UserInputError(f"--captions {path}: expected a JSON object {{image name: caption}}, got {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(value, str):
            raise UserInputError(f"--captions {path}: entry {key!r} must be a string caption, got {type(value).__name__}")
    return data


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as UTF-8 JSON (sorted keys, non-ASCII captions kept as they are), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_text(path, json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
