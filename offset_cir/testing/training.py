"""Test doubles for the trainer: callbacks that interrupt a run at a chosen step (as a SIGINT stops it, or as a
``kill -9`` ends it), and an evaluation that returns scripted selection scores (for checking which evaluation early
stopping and checkpoint selection keep)."""
from __future__ import annotations

from collections.abc import Callable, Sequence


def stop_after(steps: int) -> Callable:
    """A ``Trainer`` callback: after optimiser step ``steps`` the run stops as a SIGINT stops it ("interrupted",
    ``last/`` saved), so a test can resume it."""

    def callback(trainer) -> None:
        if trainer.state.step >= steps:
            trainer.request_stop()

    return callback


class SimulatedKill(BaseException):
    """Raised by :func:`die_after`: a ``BaseException``, so no ``except Exception`` of the trainer saves anything."""


def die_after(steps: int) -> Callable:
    """A ``Trainer`` callback: at the start of step ``steps + 1``'s after-step work (its rows unwritten) the run
    dies as under ``kill -9``: it raises :class:`SimulatedKill`, nothing is saved, and ``last/`` and
    ``metrics.jsonl`` stay as the process left them (rows after the last checkpoint included)."""

    def callback(trainer) -> None:
        if trainer.state.step > steps:
            raise SimulatedKill(f"killed after step {steps}")

    return callback


class ScriptedEvaluation:
    """Stands in for :func:`offset_cir.eval.evaluate.evaluate`: the i-th call returns ``scores[i]`` as its
    selection score (one metric, ``score``); ``calls`` counts the evaluations made. Running out of scores is an
    error: the run evaluated more often than the test expected."""

    def __init__(self, scores: Sequence[float]):
        self.scores = list(scores)
        self.calls = 0

    def __call__(self, model, bench, protocol=None, split=None, **kwargs) -> dict:
        if self.calls >= len(self.scores):
            raise AssertionError(f"evaluation {self.calls + 1} asked for; the script has {len(self.scores)} scores")
        score = float(self.scores[self.calls])
        self.calls += 1
        return {"protocol": protocol, "split": split, "metrics": {"score": score}, "selection_score": score,
                "selection_rule": "scripted"}
