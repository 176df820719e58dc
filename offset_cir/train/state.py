"""A training run on disk: its progress (``TrainState``), its checkpoint folders ``last/`` and ``best/``, and
reading them back to resume.

``last/`` holds what a resumed run needs to continue exactly: the model (``save_checkpoint``), the optimiser's
tensors and the torch RNG state (``trainer_state.safetensors``), and in ``trainer_state.json`` the config, the
optimiser's scalars, the grad scaler, the Python and NumPy RNG states, the world size and the ``TrainState``
fields. ``best/`` holds the model of the best evaluation, with its result. Every folder is written under a
temporary name and swapped in (:func:`offset_cir.io.replace_dir`): never half a checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offset_cir.config_base import parse_overrides
from offset_cir.errors import CheckpointError, UserInputError
from offset_cir.io import replace_dir, write_json, write_text
from offset_cir.model.checkpoint import WEIGHTS_NAME, load_weights, save_checkpoint
from offset_cir.train.config import TrainConfig, flat_keys, merge_overrides

log = logging.getLogger(__name__)

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
CURVES_NAME = "curves.png"
BEST_RESULT = "best_result.json"
# What a run writes into its folder: `overwrite=True` (`offset train --overwrite`) removes these, nothing else.
# (".best_result.json.tmp" and "curves.tmp.png": other temporary names a run folder may hold; removed too.)
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "summary.json", BEST_RESULT, ".best_result.json.tmp",
               CURVES_NAME, "curves.tmp.png", "tensorboard", "best", "best.tmp", "best.old", "last", "last.tmp",
               "last.old")
# The fields trainer_state.json must have to resume from it.
REQUIRED_FIELDS = ("config", "optimizer", "rng", "step", "epoch", "batch_in_epoch")
# The keys a resumed run may change (`offset train --resume DIR max_steps=N`): its budget. Everything else
# stays as saved, so that the data order and the optimisation continue exactly.
RESUME_OVERRIDES = ("max_steps", "epochs", "time_budget_minutes", "early_stop_patience")


@dataclass
class TrainState:
    """Where a run is: saved in ``last/trainer_state.json`` and restored on resume.

    Args:
        step: optimiser steps done.
        epoch: epochs completed; the epoch being trained is ``epoch + 1``, counted from 1 as the config
            (``optim.decay_epochs_1based``), the logs, metrics.jsonl and the progress bar count.
        batch_in_epoch: batches of ``epoch`` this process has read (micro-batches under gradient accumulation);
            a resumed run skips them.
        best_score: the best selection score so far (None before the first evaluation).
        best_step: the step of ``best_score`` (the model in ``best/``).
        evals_since_best: evaluations since the best one (early stopping counts these).
        history: one row per evaluation: ``{"step", "epoch", "eval": metrics, "selection": score}``.
        elapsed_s: seconds of the run so far, over all its invocations, training and evaluation (the time budget
            counts these; the set-up of each invocation and the work a killed process did after its last
            checkpoint are not counted).
        eval_s: of ``elapsed_s``, the seconds spent evaluating.
        triplets: triplets through forward and backward so far, all processes together, over all invocations.
        metrics_rows: rows of ``metrics.jsonl`` written up to this state; a resumed run keeps these and drops the
            rows after them (None in a checkpoint written without the count: the rows up to ``step`` are kept).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_score: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    history: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    eval_s: float = 0.0
    triplets: int = 0
    metrics_rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def throughput(self) -> dict[str, float]:
        """The whole run's time and throughput, as summary.json gives them: ``seconds`` (training and evaluation),
        ``eval_seconds``, ``train_seconds`` (evaluation excluded), ``triplets`` and ``triplets_per_s`` (per second
        of training), all processes together."""
        train_s = max(self.elapsed_s - self.eval_s, 0.0)
        return {"seconds": self.elapsed_s, "eval_seconds": self.eval_s, "train_seconds": train_s,
                "triplets": self.triplets, "triplets_per_s": self.triplets / train_s if train_s > 0 else 0.0}

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        """The fields found in ``saved`` (a ``trainer_state.json``), defaults for the others."""
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


# ------------------------------------------------------------------------------------------ reading
def find_resumable(run_dir: Path) -> Path | None:
    """The run's complete ``last`` checkpoint folder, or None."""
    for name in ("last", "last.old"):  # .old survives a crash between the two renames
        cand = Path(run_dir) / name
        if (cand / STATE_JSON).is_file() and (cand / WEIGHTS_NAME).is_file():
            return cand
    return None


def read_state_json(folder: Path) -> dict:
    """``folder/trainer_state.json``, checked for the fields a resume needs."""
    path = Path(folder) / STATE_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable trainer state ({exc}); the weights in {folder} are still usable "
                              "with `offset eval --checkpoint`") from exc
    missing = [k for k in REQUIRED_FIELDS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: trainer state lacks the fields {missing}")
    return meta


def read_resumable(run_dir, overrides: list[str] | None = None) -> tuple[Path, TrainState, TrainConfig]:
    """(its ``last`` folder, its state, its saved config with ``key=value`` changes of its budget) of a run to
    resume; a run without a complete checkpoint, or a change of anything but the budget, is refused by name."""
    folder = find_resumable(Path(run_dir))
    if folder is None:
        raise UserInputError(f"--resume {run_dir}: no complete checkpoint (last/{STATE_JSON}) found there")
    saved = read_state_json(folder)
    data = saved["config"]
    if overrides:
        refused = sorted(k for k in flat_keys(parse_overrides(overrides)) if k not in RESUME_OVERRIDES)
        if refused:
            raise UserInputError(
                f"--resume {run_dir}: {', '.join(refused)} cannot change on resume (the run continues with its "
                f"saved config); only its budget can: {', '.join(RESUME_OVERRIDES)}")
        data = merge_overrides(data, overrides)
    cfg = TrainConfig.from_dict(data, source=str(folder / STATE_JSON), key="config")
    cfg.out_dir = str(run_dir)
    return folder, TrainState.from_dict(saved), cfg


def _optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {}
    for pid, st in sd["state"].items():
        meta[str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta[str(pid)][k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": meta}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in meta["scalars"].items()}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _host_rng_states() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _set_host_rng_states(rng: dict) -> None:
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = rng["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))


# ------------------------------------------------------------------------------------------ writing
def save_training_state(target: Path, model, opt, scaler, config: dict, state: TrainState, world_size: int) -> None:
    """Write the resumable checkpoint folder ``target`` (``run_dir/last``) whole, in place of the old one."""
    from safetensors.torch import save_file

    def write(folder: Path) -> None:
        save_checkpoint(model, folder)
        tensors, opt_meta = _optimizer_to_files(opt)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(folder / STATE_TENSORS))
        meta = {
            "config": config,
            "optimizer": opt_meta,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": _host_rng_states(),
            **state.to_dict(),
            "world_size": world_size,
        }
        write_json(folder / STATE_JSON, meta, indent=1)

    replace_dir(target, write)


def load_training_state(folder: Path, model, opt, scaler, world_size: int) -> TrainState:
    """Restore the model, optimiser, grad scaler and RNG states of ``folder``; returns its ``TrainState``."""
    from safetensors.torch import load_file

    load_weights(model, folder)
    meta = read_state_json(folder)
    if meta.get("world_size", 1) != world_size:
        raise UserInputError(
            f"{folder}: the run was saved with {meta.get('world_size', 1)} process(es); resume it with the same "
            f"number (now {world_size}) so that the data order continues exactly")
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
        opt.load_state_dict(_optimizer_from_files(tensors, meta["optimizer"]))
    except Exception as exc:
        raise CheckpointError(f"{folder / STATE_TENSORS}: optimiser state unreadable or of another model ({exc})") from exc
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    _set_host_rng_states(meta["rng"])
    log.info("resumed from %s at step %d (epoch %d, batch %d)", folder, meta["step"], meta["epoch"], meta["batch_in_epoch"])
    return TrainState.from_dict(meta)


def save_best(run_dir: Path, model, score: float, step: int, result: dict) -> None:
    """``run_dir/best`` (the model, its score, step and result in its config; not with ``model=None``) and
    ``run_dir/best_result.json``."""
    if model is not None:
        replace_dir(run_dir / "best",
                    lambda folder: save_checkpoint(model, folder, extra={"selection_score": score, "step": step,
                                                                         "result": result}))
    write_json(run_dir / BEST_RESULT, result, indent=2)


def occupied(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` (empty when it is absent or empty); a file in its place is refused by name."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserInputError(f"out_dir {run_dir} is a file, not a folder: choose another out_dir=FOLDER")
    return sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []


def refuse_occupied_run_dir(run_dir: Path, refuse: bool) -> None:
    """A new run never mixes with, or replaces, another one in its folder unless asked: ``refuse`` (on any rank
    the folder holds something and ``--overwrite`` was not given) raises a UserInputError saying what to do."""
    if refuse:
        held = occupied(run_dir)
        shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
        raise UserInputError(
            f"out_dir {run_dir} is not empty (it holds {shown or 'files'}): continue the run there with "
            f"`offset train --resume {run_dir}`, train into another folder (out_dir=NEW_FOLDER), or give "
            f"--overwrite to replace it")


def make_run_dir(run_dir: Path, config_yaml: str, replace: bool) -> None:
    """The run's folder with its ``config.yaml``; ``replace``: an earlier run's outputs there are removed first."""
    if replace and run_dir.is_dir():
        removed = remove_run_outputs(run_dir)
        if removed:
            log.warning("--overwrite: removed the previous run's %s from %s", ", ".join(removed), run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", config_yaml)


def remove_run_outputs(run_dir: Path) -> list[str]:
    """Delete what an earlier run wrote into ``run_dir`` (``RUN_OUTPUTS`` and their temporaries, nothing else);
    returns the names removed."""
    present = [name for name in RUN_OUTPUTS if (run_dir / name).exists() or (run_dir / name).is_symlink()]
    # the hidden temporaries of offset_cir.io (".<name>.tmp<pid>") that a killed process may have left
    temporaries = sorted(p.name for name in RUN_OUTPUTS for p in run_dir.glob(f".{name}.tmp*"))
    removed = list(dict.fromkeys(present + temporaries))
    for name in removed:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed
