"""Figures: a matplotlib figure made without pyplot's global state, and saved whole or not at all.

Every chart of the project (a run's ``curves.png``, the demo's figures, retrieval sheets) starts with
:func:`new_figure` and ends with :func:`save_figure`: no process-wide backend switch, no display needed, no
figure left registered anywhere, and a crash never leaves half a PNG (the file is renamed into place).
"""
from __future__ import annotations

import os
from pathlib import Path

from offset_cir.extras import import_extra
from offset_cir.io import atomic_path

__all__ = ["new_figure", "save_figure"]


def new_figure(figsize: tuple[float, float], *, dpi: int = 100, purpose: str = "drawing figures"):
    """A :class:`matplotlib.figure.Figure` of ``figsize`` inches; ``purpose`` names the work in the message
    that tells a person to install the ``train`` extra when matplotlib is missing."""
    return import_extra("matplotlib.figure", "train", purpose).Figure(figsize=figsize, dpi=dpi)


def save_figure(fig, path: str | os.PathLike, *, dpi: int | None = None) -> Path:
    """Write ``fig`` to ``path`` as PNG through a temporary file renamed over it; the folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **({"dpi": dpi} if dpi else {}))
    return path
