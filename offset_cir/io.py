"""Atomic file writes: a file or folder appears whole under its name, or not at all.

Every writer puts its bytes under a temporary name in the same folder (so the final ``os.replace`` is a rename on
one file system), flushes them to disk (not with ``durable=False``, for derived data such as cache entries), and
swaps them in; an exception leaves the old file as it was and removes
the temporary one. Library code that writes something a user keeps (a checkpoint, an index, a result) goes
through these helpers.

Every file they put in place has the mode a plain ``open`` gives under the process umask (``0o666 & ~umask``),
whatever the writer inside chose: some writers make their own private temporary (safetensors' ``save_file``
writes 0600).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from offset_cir.errors import UserInputError

__all__ = ["atomic_path", "atomic_open", "write_bytes", "write_text", "write_json", "write_jsonl", "read_jsonl",
           "read_format_json", "save_npy", "replace_dir", "is_temporary", "plain_file_mode"]


def _temporary_name(path: Path) -> Path:
    # hidden, and unique per process so two writers of one file never share a temporary
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named like one of these helpers' temporary files (left behind only by a killed
    process), so a writer can clean up after an interrupted run."""
    name = Path(path).name
    stem, sep, pid = name.rpartition(".tmp")
    return bool(sep) and name.startswith(".") and len(stem) > 1 and pid.isdigit()


def plain_file_mode() -> int:
    """The permission bits ``open(path, "w")`` gives a new file now: ``0o666`` less the process umask."""
    try:  # Linux: read the umask without changing it (os.umask is set-and-return, racy between threads)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _give_plain_modes(path: Path) -> None:
    """Set every regular file at or below ``path`` to :func:`plain_file_mode` (links are left alone)."""
    mode = plain_file_mode()
    for p in [path] if path.is_file() else path.rglob("*"):
        if p.is_file() and not p.is_symlink() and (p.stat().st_mode & 0o7777) != mode:
            os.chmod(p, mode)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error it replaces ``path``.

    For writers that take a file name (``safetensors.torch.save_file``, ``faiss.write_index``). ``durable=False``
    skips flushing the bytes to disk before the rename: a killed process still leaves the old file or the new one
    whole, but after a power loss the new name may hold a torn file. Only for data that is derived and checked when
    read (a cache entry, recomputed when unreadable), never for what a user keeps.
    """
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        yield tmp
        _give_plain_modes(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = None, *,
                durable: bool = True) -> Iterator[IO]:
    """``open(path, mode)`` whose content replaces ``path`` only when the block ends without an error
    (``durable``: as in :func:`atomic_path`)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode {mode!r}; expected 'w' or 'wb'")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path, durable=durable) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f


def write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (``durable``: as in :func:`atomic_path`)."""
    with atomic_open(path, "wb", durable=durable) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict], *, sort_keys: bool = True) -> None:
    """Write one JSON object per line to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=sort_keys) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a ``.jsonl`` file, blank lines skipped; a line that is not a JSON object is a
    :class:`~offset_cir.errors.UserInputError` naming the file and the line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserInputError(f"{path}: line {lineno} is not JSON ({exc})") from None
            if not isinstance(row, dict):
                raise UserInputError(f"{path}: line {lineno} is {type(row).__name__}, expected a JSON object")
            out.append(row)
    return out


def read_format_json(path: str | os.PathLike, fmt: str, version: int, kind: str) -> dict:
    """A JSON object that names its ``format`` and ``version`` (an index manifest, an export's ``export.json``):
    refused, naming ``path``, when it is not JSON, not an object, of another format (not a ``kind``), or newer
    than ``version``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UserInputError(f"{path}: not an offset-cir {kind} (field 'format' is {got!r}, expected {fmt!r})")
    if int(data.get("version", -1)) > version:
        raise UserInputError(f"{path}: {kind} version {data.get('version')} is newer than this offset-cir "
                             f"understands ({version})")
    return data


def save_npy(path: str | os.PathLike, array) -> None:
    """``numpy.save`` to ``path`` atomically (``path`` keeps its name; no ``.npy`` is appended)."""
    import numpy as np

    with atomic_open(path, "wb") as f:
        np.save(f, array)


def replace_dir(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Fill a folder with ``write(folder)`` under a temporary name, then swap it in for ``target``.

    A reader sees the old folder or the new one, never a half-written one; an error in ``write`` leaves ``target``
    as it was. (Between the two renames there is an instant when ``target`` is absent; the old folder is then at
    ``<target>.old`` and is deleted only after the new one is in place.) Every file in it gets the mode a plain
    ``open`` gives (:func:`plain_file_mode`), whichever writer made it.
    """
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        _give_plain_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
