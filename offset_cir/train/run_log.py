"""What a run logs as it goes: rows of ``metrics.jsonl``, TensorBoard scalars, and ``curves.png`` redrawn from them.

Only the main process logs (``enabled``); the others hold a :class:`RunLog` that does nothing. A resumed run
continues the rows its checkpoint covers (``TrainState.metrics_rows``) and drops those a killed process wrote after
its last checkpoint, so each step appears once and the rows are those of an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from offset_cir.errors import UserInputError
from offset_cir.extras import import_extra
from offset_cir.io import write_text
from offset_cir.train.curves import plot_curves
from offset_cir.train.state import CURVES_NAME, TrainState

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
    """``metrics.jsonl``, ``tensorboard/`` and ``curves.png`` of the run in ``run_dir``; ``rows`` counts the lines
    of metrics.jsonl (a checkpoint records it as ``TrainState.metrics_rows``)."""

    def __init__(self, run_dir: Path, name: str, enabled: bool, curves: bool = True):
        self.run_dir, self.name, self.enabled, self.curves = Path(run_dir), name, enabled, curves
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.writer = None
        self.rows = 0
        self._purge_step: int | None = None

    def resume(self, state: TrainState) -> None:
        """Continue the log of a run resumed at ``state``: keep the rows of metrics.jsonl its checkpoint covers,
        drop the rows written after it (the resumed run trains those steps again and writes them anew), and have
        TensorBoard hide its events after ``state.step``."""
        self._purge_step = state.step + 1
        if not self.enabled or not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
        self.rows = min(covered_rows(lines, state), len(lines))
        if self.rows < len(lines):
            write_text(self.metrics_path, "".join(lines[:self.rows]))
            log.warning("%s: dropped %d row(s) written after the checkpoint of step %d; the resumed run writes "
                        "those steps again", self.metrics_path, len(lines) - self.rows, state.step)

    def open_tensorboard(self) -> None:
        """Start TensorBoard logging (once the run folder exists); on resume, events after the checkpoint's step
        are purged, as metrics.jsonl's rows are."""
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self._purge_step)

    def row(self, row: dict, scalars: dict[str, float] | None = None, step: int | None = None) -> None:
        """One line of metrics.jsonl; ``scalars`` (name -> value) also go to TensorBoard at ``step``."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.rows += 1
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


def covered_rows(lines: list[str], state: TrainState) -> int:
    """How many of metrics.jsonl's ``lines`` the checkpoint of ``state`` covers: its ``metrics_rows``, or for a
    checkpoint without that count the leading rows of steps up to ``state.step``."""
    if state.metrics_rows is not None:
        return state.metrics_rows
    kept = 0
    for line in lines:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # a line torn by the kill
            break
        if not isinstance(step, int) or step > state.step:
            break
        kept += 1
    return kept
