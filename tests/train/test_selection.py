"""Budgets of a run: which one is used up, and the words that name it with where the run ended."""
from __future__ import annotations

import pytest

from offset_cir.train.config import load_config
from offset_cir.train.selection import STOPPED_BY, budget_reason, budget_used, max_steps_out_of_reach
from offset_cir.train.state import TrainState


def _cfg(*overrides):
    return load_config("synthetic", ["epochs=20", "max_steps=40", *overrides])


@pytest.mark.parametrize("state, overrides, key, words", [
    (TrainState(step=20, epoch=20), (), "epochs",
     "epochs=20 done at step 20, end of epoch 20 (max_steps=40 not reached)"),
    (TrainState(step=40, epoch=13, batch_in_epoch=1), ("time_budget_minutes=5",), "max_steps",
     "max_steps=40 reached at step 40, in epoch 14 (epochs=20 not reached, time_budget_minutes=5 not reached)"),
    (TrainState(step=7, epoch=2, batch_in_epoch=1, elapsed_s=91.0), ("time_budget_minutes=1.5",),
     "time_budget_minutes",
     "time_budget_minutes=1.5 used (1.5 min) at step 7, in epoch 3 (max_steps=40 not reached, epochs=20 not reached)"),
    (TrainState(step=12, epoch=4, evals_since_best=2), ("early_stop_patience=2", "max_steps=null"),
     "early_stop_patience",
     "early stopping after 2 evaluations without improvement (early_stop_patience=2) at step 12, end of epoch 4 "
     "(epochs=20 not reached)"),
])
def test_the_used_budget_is_named_with_its_value_and_the_limits_not_reached(state, overrides, key, words):
    cfg = _cfg(*overrides)
    assert budget_used(cfg, state) == (words, key)
    assert budget_reason(cfg, state, key) == words
    assert key in STOPPED_BY


def test_no_budget_used_is_none():
    assert budget_used(_cfg("early_stop_patience=3"), TrainState(step=39, epoch=19, evals_since_best=2)) is None


def test_max_steps_out_of_reach_names_the_step_where_epochs_end_the_run():
    # 1 step per epoch: epochs=20 ends the run at step 20, before max_steps=40
    assert max_steps_out_of_reach(_cfg(), TrainState(), steps_per_epoch=1) == (
        "max_steps=40 is out of reach: epochs=20 of 1 step(s) end the run at step 20 (raise epochs to train longer)")
    # resumed mid-epoch 6 (2 of 4 steps done): 22 + 2 + 14 x 4 = 80 steps, max_steps=40 comes first
    assert max_steps_out_of_reach(_cfg(), TrainState(step=22, epoch=5, batch_in_epoch=2), steps_per_epoch=4) is None
    assert "end the run at step 80" in max_steps_out_of_reach(_cfg("max_steps=81"),
                                                               TrainState(step=22, epoch=5, batch_in_epoch=2), 4)
    # grad_accum=2: batch_in_epoch counts micro-batches, 4 of them are epoch 6's 2 steps: 22 + 0 + 14 x 2 = 50
    cfg = _cfg("max_steps=81", "optim.grad_accum=2")
    assert "end the run at step 50" in max_steps_out_of_reach(cfg, TrainState(step=22, epoch=5, batch_in_epoch=4), 2)
    assert max_steps_out_of_reach(_cfg("max_steps=null"), TrainState(), 1) is None
