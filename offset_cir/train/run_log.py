"""What a run logs as it goes: rows of ``metrics.jsonl``, TensorBoard scalars, and ``curves.png`` redrawn from them.

Only the main process logs (``enabled``); the others hold a :class:`RunLog` that does nothing.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from offset_cir.errors import UserInputError
from offset_cir.extras import import_extra
from offset_cir.train.curves import plot_curves
from offset_cir.train.state import CURVES_NAME

log = logging.getLogger(__name__)

__all__ = ["RunLog", "check_train_extras"]


def check_train_extras(tensorboard: bool) -> bool:
    """What the `train` extra installs, checked before anything is trained or written: TensorBoard logging needs
    it (an error); curves.png is best effort, as every figure is (a warning). Returns whether curves are drawn."""
    curves = True
    try:
        import_extra("matplotlib", "train", "drawing curves.png")
    except UserInputError as exc:
        curves = False
        log.warning("%s; training goes on without curves.png", exc)
    if tensorboard:
        import_extra("tensorboard", "train",
                     "TensorBoard logging (tensorboard=true; tensorboard=false trains without it)")
    return curves


class RunLog:
    """``metrics.jsonl``, ``tensorboard/`` and ``curves.png`` of the run in ``run_dir``."""

    def __init__(self, run_dir: Path, name: str, enabled: bool, curves: bool = True):
        self.run_dir, self.name, self.enabled, self.curves = Path(run_dir), name, enabled, curves
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.writer = None

    def open_tensorboard(self) -> None:
        """Start TensorBoard logging (once the run folder exists)."""
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def row(self, row: dict, scalars: dict[str, float] | None = None, step: int | None = None) -> None:
        """One line of metrics.jsonl; ``scalars`` (name -> value) also go to TensorBoard at ``step``."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in (scalars or {}).items():
                self.writer.add_scalar(key, value, step)

    def draw_curves(self) -> None:
        """Redraw curves.png from metrics.jsonl (a figure never stops a run: a failure is a warning)."""
        if not self.enabled or not self.curves or not self.metrics_path.is_file():
            return
        try:
            plot_curves(self.metrics_path, self.run_dir / CURVES_NAME, title=self.name)
        except Exception as exc:  # a figure must never stop a run
            log.warning("%s not drawn (%s)", self.run_dir / CURVES_NAME, exc)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
