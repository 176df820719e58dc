"""Checkpoint selection and a run's budgets: which evaluation is the best, and when a run is done.

As the release selects: a score is better only when it is strictly higher (a tie keeps the earlier evaluation),
and a run stops after ``early_stop_patience`` evaluations in a row without a better score. (The release's
``tolerance_epoch=5`` trains one more epoch after its fourth evaluation without improvement and never evaluates
it, so that epoch can never be selected: offset-cir's patience of 4 selects the same evaluation and leaves that
epoch out.)
"""
from __future__ import annotations

from offset_cir.train.state import TrainState

__all__ = ["record_evaluation", "patience_used", "budget_used", "budget_reason", "max_steps_out_of_reach", "STOPPED_BY"]


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


# What ended a run, as ``summary.json`` says it: the config key of the budget (``ended_by``) -> ``stopped``.
STOPPED_BY = {"max_steps": "max_steps", "epochs": "epochs done", "time_budget_minutes": "time budget",
              "early_stop_patience": "early stop"}


def budget_used(cfg, state: TrainState) -> tuple[str, str] | None:
    """(what ended the run, the key that raises that budget) when ``state`` has used up a budget of ``cfg`` (a
    ``TrainConfig``): max_steps, epochs, time_budget_minutes or early stopping; else None."""
    if cfg.max_steps and state.step >= cfg.max_steps:
        key = "max_steps"
    elif state.epoch >= cfg.epochs:
        key = "epochs"
    elif cfg.time_budget_minutes and state.elapsed_s >= cfg.time_budget_minutes * 60:
        key = "time_budget_minutes"
    elif patience_used(state, cfg.early_stop_patience):
        key = "early_stop_patience"
    else:
        return None
    return budget_reason(cfg, state, key), key


def budget_reason(cfg, state: TrainState, key: str) -> str:
    """Words for the budget ``key`` (a key of ``STOPPED_BY``) that ended the run at ``state``, with the step and
    epoch it ended at and the other limits set that it did not reach: ``epochs=20 done at step 20, end of epoch
    20 (max_steps=40 not reached)``."""
    if key == "max_steps":
        what = f"max_steps={cfg.max_steps} reached"
    elif key == "epochs":
        what = f"epochs={cfg.epochs} done"
    elif key == "time_budget_minutes":
        what = f"time_budget_minutes={cfg.time_budget_minutes:g} used ({state.elapsed_s / 60:.1f} min)"
    else:
        what = (f"early stopping after {state.evals_since_best} evaluations without improvement "
                f"(early_stop_patience={cfg.early_stop_patience})")
    where = f"end of epoch {state.epoch}" if state.batch_in_epoch == 0 else f"in epoch {state.epoch + 1}"
    reached = {"max_steps": bool(cfg.max_steps) and state.step >= cfg.max_steps, "epochs": state.epoch >= cfg.epochs,
               "time_budget_minutes": bool(cfg.time_budget_minutes)
               and state.elapsed_s >= cfg.time_budget_minutes * 60}
    others = [f"{name}={getattr(cfg, name):g} not reached" for name, done in reached.items()
              if name != key and getattr(cfg, name) and not done]
    return f"{what} at step {state.step}, {where}" + (f" ({', '.join(others)})" if others else "")


def max_steps_out_of_reach(cfg, state: TrainState, steps_per_epoch: int) -> str | None:
    """A warning when ``epochs`` ends the run before ``max_steps`` can: it names the step where the run ends."""
    last = state.step + (cfg.epochs - state.epoch) * steps_per_epoch - state.batch_in_epoch // cfg.optim.grad_accum
    if not cfg.max_steps or last >= cfg.max_steps:
        return None
    return (f"max_steps={cfg.max_steps} is out of reach: epochs={cfg.epochs} of {steps_per_epoch} step(s) end the "
            f"run at step {last} (raise epochs to train longer)")
