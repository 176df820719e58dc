"""Checkpoint selection and a run's budgets: which evaluation is the best, and when a run is done.

As the release selects: a score is better only when it is strictly higher (a tie keeps the earlier evaluation),
and a run stops after ``early_stop_patience`` evaluations in a row without a better score. (The release's
``tolerance_epoch=5`` trains one more epoch after its fourth evaluation without improvement and never evaluates
it, so that epoch can never be selected: offset-cir's patience of 4 selects the same evaluation and leaves that
epoch out.)
"""
from __future__ import annotations

from offset_cir.train.state import TrainState

__all__ = ["record_evaluation", "patience_used", "budget_used"]


def record_evaluation(state: TrainState, score: float) -> bool:
    """Count the evaluation of ``state.step`` scoring ``score``; True when it is the new best."""
    if state.best_score is None or score > state.best_score:
        state.best_score, state.best_step, state.evals_since_best = score, state.step, 0
        return True
    state.evals_since_best += 1
    return False


def patience_used(state: TrainState, patience: int | None) -> bool:
    """Whether early stopping ends the run: ``patience`` evaluations in a row without a better score."""
    return patience is not None and state.evals_since_best >= patience


def budget_used(cfg, state: TrainState) -> tuple[str, str] | None:
    """(what ended the run, the key that raises that budget) when ``state`` has used up a budget of ``cfg`` (a
    ``TrainConfig``): max_steps, epochs, time_budget_minutes or early stopping; else None."""
    if cfg.max_steps and state.step >= cfg.max_steps:
        return f"max_steps={cfg.max_steps} reached", "max_steps"
    if state.epoch >= cfg.epochs:
        return f"epochs={cfg.epochs} done", "epochs"
    if cfg.time_budget_minutes and state.elapsed_s >= cfg.time_budget_minutes * 60:
        return f"time_budget_minutes={cfg.time_budget_minutes:g} used", "time_budget_minutes"
    if patience_used(state, cfg.early_stop_patience):
        return (f"early stopping after {state.evals_since_best} evaluations without improvement "
                f"(early_stop_patience={cfg.early_stop_patience})"), "early_stop_patience"
    return None
