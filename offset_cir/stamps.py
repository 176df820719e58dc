"""Version stamps: which offset-cir, Python and libraries wrote a result, an index or an export.

One function, :func:`environment`, so that every file that records its making uses the same keys (the
distribution names of PyPI, plus ``python``); a package that is not installed is recorded as ``None``.
"""
from __future__ import annotations

import importlib.metadata as md
import platform

__all__ = ["CORE_PACKAGES", "environment"]

#: recorded in every stamp; a caller adds the packages its file depends on (``onnxruntime`` for an export ...)
CORE_PACKAGES = ("offset-cir", "torch", "torchvision", "open_clip_torch", "numpy", "pillow")


def environment(*extra: str) -> dict[str, str | None]:
    """``{"python": "3.11.9", "offset-cir": "0.1.0", "torch": ..., <extra>: ...}``; missing packages map to None."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in (*CORE_PACKAGES, *extra):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out
