"""Retrieval sheet: for a few queries, the reference, the text, the top results and the true target (matplotlib).

Used by ``offset eval --sheet N`` and by the demo's ``retrievals.png``. The rows are the per-query records
written by ``evaluate(..., save_rankings=FILE)`` (``reference``, ``text``, ``target``, ``top``).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable

from offset_cir.io import read_jsonl
from offset_cir.plots import new_figure, save_figure

# marks(row, image_id) -> [(attribute, whether the image has what the text asks for it), ...]
Marks = Callable[[dict, str], list[tuple[str, bool]]]


def read_rankings(path, gallery: str | None = None) -> list[dict]:
    """The rows of a rankings file (JSON Lines); with ``gallery``, only that gallery's rows."""
    rows = read_jsonl(path)
    return [r for r in rows if gallery is None or r.get("gallery") in (None, gallery)]


def spread(rows: list, n: int) -> list:
    """``n`` rows evenly spread over ``rows`` (first one included), in order; all of them when there are fewer."""
    if n >= len(rows):
        return list(rows)
    return [rows[(i * len(rows)) // n] for i in range(n)]


def draw_retrieval_sheet(rows: list[dict], image_path: Callable[[str], object], out, k: int = 5,
                         title: str | None = None, marks: Marks | None = None) -> Path:
    """One line per row: reference, text, top-``k`` (the target framed in green where it appears) and the
    target with its rank. ``image_path`` maps an image id to its file (``bench.image_path``). ``marks(row,
    image_id)`` (e.g. :func:`offset_cir.eval.attributes.asked_marks`) lists the attributes the row's text asks
    for and whether the image has each: written under each shown result (a tick or a cross per attribute)."""
    from offset_cir.images import read_image

    def show(ax, image_id):
        ax.imshow(read_image(image_path(image_id), "RGB"))

    cols = k + 3
    n = max(1, len(rows))
    fig = new_figure((1.6 * cols, (2.4 if marks is not None else 1.8) * n), purpose="drawing a retrieval sheet")
    axes = fig.subplots(n, cols, squeeze=False)
    for r, row in enumerate(rows):
        line = axes[r]
        show(line[0], row["reference"])
        line[0].set_title("reference", fontsize=7)
        line[1].text(0.0, 0.5, "\n".join(textwrap.wrap(str(row["text"]), 22)), fontsize=7, va="center")
        top = list(row.get("top") or [])
        for c in range(k):
            ax = line[c + 2]
            if c >= len(top):
                ax.axis("off")
                continue
            show(ax, top[c])
            if marks is not None:
                _mark(ax, marks(row, top[c]))
            hit = top[c] == row["target"]
            ax.set_title(f"#{c + 1}" + (" target" if hit else ""), fontsize=7, color="green" if hit else "black")
            if hit:
                for spine in ax.spines.values():
                    spine.set_edgecolor("green")
                    spine.set_linewidth(3)
        show(line[k + 2], row["target"])
        if marks is not None:
            _mark(line[k + 2], marks(row, row["target"]))
        rank = top.index(row["target"]) + 1 if row["target"] in top else None
        line[k + 2].set_title(f"target (rank {rank})" if rank else f"target (rank > {len(top)})", fontsize=7,
                              color="green")
        for ax in line:
            ax.set_xticks([])
            ax.set_yticks([])
        line[1].axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)


def _mark(ax, marks: list[tuple[str, bool]]) -> None:
    """Under a tile: one line per attribute the text asks for, a tick (green) where the image has it, a cross
    (red) where not."""
    for i, (attr, ok) in enumerate(marks):
        ax.text(0.5, -0.06 - 0.13 * i, ("\u2713 " if ok else "\u2717 ") + attr, transform=ax.transAxes, ha="center",
                va="top", fontsize=6, color="green" if ok else "red")
