"""Training curves: the losses and validation metrics of a run's metrics.jsonl drawn to curves.png."""
from __future__ import annotations

import re
from pathlib import Path

from offset_cir.io import read_jsonl
from offset_cir.plots import new_figure, save_figure

__all__ = ["plot_curves"]


def plot_curves(metrics_path: Path, png: Path, title: str = "") -> None:
    """Training losses and validation metrics of ``metrics.jsonl`` drawn to ``png``, written whole or not at all
    (a temporary file renamed over it: a crash never leaves half a PNG)."""
    rows = read_jsonl(metrics_path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if isinstance(r.get("eval"), dict)]
    fig = new_figure((12, 4.2), purpose="drawing curves.png")
    ax_loss, ax_val = fig.subplots(1, 2)
    for key, style in (("loss", ".-"), ("bbc", ".--"), ("fr", ".:")):
        points = [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
        if points:
            ax_loss.plot(*zip(*points), style, label="total" if key == "loss" else key)
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss")
    names = {k for r in evals for k, v in r["eval"].items() if isinstance(v, (int, float))}
    # plain recalls (R@K) first, then the others; more than 10 lines are unreadable (metrics.jsonl has them all)
    names = sorted(names, key=lambda k: (not re.fullmatch(r"R@\d+", k), len(k), k))[:10]
    for name in names:
        points = [(r["step"], r["eval"][name]) for r in evals if isinstance(r["eval"].get(name), (int, float))]
        ax_val.plot(*zip(*points), "o-", markersize=3, label=name)
    if evals and all(isinstance(r.get("selection"), (int, float)) for r in evals):
        ax_sel = ax_val.twinx()
        ax_sel.plot([r["step"] for r in evals], [r["selection"] for r in evals], "k--", label="selection score")
        ax_sel.set_ylabel("selection score (black, dashed)")
    ax_val.set(xlabel="step", ylabel="validation metric", title="validation" if evals else "validation (none yet)")
    ax_loss.grid(alpha=0.3)
    ax_val.grid(alpha=0.3)
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=7)
    if names:
        ax_val.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.15, 1.0))
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.06, right=0.79, bottom=0.12, top=0.86, wspace=0.32)  # tight_layout costs twice the time
    save_figure(fig, png)
