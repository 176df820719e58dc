"""Content hashes: one SHA-256 of a file or of bytes, and the ``sha256:<hex>`` form that records carry.

An index manifest, an export's ``export.json``, a recorded result and a dataset manifest all name the file they
came from by its content; this module is the one place that reads a file for that and writes the prefix.
"""
from __future__ import annotations

import hashlib
import os

__all__ = ["HASH_PREFIX", "file_sha256", "bytes_sha256", "tagged", "is_tagged"]

HASH_PREFIX = "sha256:"
_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    """The hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def tagged(hex_digest: str) -> str:
    """``sha256:<hex>``: a hex digest in the form records store (a tagged one is returned as it is)."""
    return hex_digest if is_tagged(hex_digest) else HASH_PREFIX + hex_digest


def is_tagged(value: object) -> bool:
    """Whether ``value`` is a string in the ``sha256:<hex>`` form."""
    return isinstance(value, str) and value.startswith(HASH_PREFIX)
