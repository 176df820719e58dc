"""The trainer (SPEC section 5): AdamW with two parameter groups, step decay, accumulation, autocast,
evaluation and early stopping, atomic resumable checkpoints, and DistributedDataParallel under torchrun.

Data order and augmentation are deterministic: the sampler permutes indices with a generator seeded by
(seed, epoch), and every item's random crop is drawn from an RNG seeded by (seed, epoch, index). So a run
that is interrupted and resumed sees exactly the data an uninterrupted run sees, and N processes with batch B
see the same triplets as one process with batch N*B.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from offset_cir.errors import CheckpointError, DatasetError, TrainingError, UserInputError
from offset_cir.model.checkpoint import WEIGHTS_NAME, load_weights, save_checkpoint
from offset_cir.train.config import TrainConfig, _merge, config_from_dict, parse_overrides
from offset_cir.train.distributed import any_rank, barrier, gather_with_grad, init_distributed
from offset_cir.train.signals import stop_signals_handled_by

log = logging.getLogger(__name__)

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
CURVES_NAME = "curves.png"
# What a run writes into its folder: `overwrite=True` (`offset train --overwrite`) removes these, nothing else.
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "summary.json", "best_result.json", ".best_result.json.tmp",
               CURVES_NAME, "curves.tmp.png", "tensorboard", "best", "best.tmp", "best.old", "last", "last.tmp",
               "last.old")
# The keys a resumed run may change (`offset train --resume DIR max_steps=N`): its budget. Everything else
# stays as saved, so that the data order and the optimisation continue exactly.
RESUME_OVERRIDES = ("max_steps", "epochs", "time_budget_minutes", "early_stop_patience")


# ------------------------------------------------------------------ data order
class EpochSampler(Sampler):
    """Yields ``(epoch, index)``: a permutation seeded by (seed, epoch), cut to whole global batches,
    this rank's share ``perm[rank::world]``, starting after ``skip`` items (resume)."""

    def __init__(self, n: int, seed: int, global_batch: int, rank: int = 0, world: int = 1):
        if n < global_batch:
            raise UserInputError(f"the training split has {n} triplets, fewer than one global batch ({global_batch})")
        self.n, self.seed, self.global_batch, self.rank, self.world = n, seed, global_batch, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def per_rank(self) -> int:
        return (self.n // self.global_batch) * self.global_batch // self.world

    def __len__(self) -> int:
        return self.per_rank() - self.skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: (self.n // self.global_batch) * self.global_batch]
        mine = perm[self.rank:: self.world].tolist()
        for i in mine[self.skip:]:
            yield self.epoch, i


class SeededItems(Dataset):
    """Each item's augmentation drawn from an RNG seeded by (seed, epoch, index): independent of workers,
    ranks and interruptions."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch * 10_007 + index) % (2**63))
            return self.base[index]


# -------------------------------------------------------------- state on disk
def _atomic_dir_write(target: Path, write: Callable[[Path], None]) -> None:
    """Write a folder completely under a temporary name, then swap it in (never a half-written checkpoint)."""
    tmp = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def find_resumable(run_dir: Path) -> Path | None:
    for name in ("last", "last.old"):  # .old survives a crash between the two renames
        cand = run_dir / name
        if (cand / STATE_JSON).is_file() and (cand / WEIGHTS_NAME).is_file():
            return cand
    return None


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


# --------------------------------------------------------------------- trainer
class Trainer:
    """``Trainer(cfg).fit()``; ``Trainer(cfg, resume=run_dir)`` continues an interrupted run.

    ``overwrite``: a new run may replace the run already in ``cfg.out_dir`` (refused otherwise).
    ``overrides``: on resume, ``key=value`` changes of the budget only (``RESUME_OVERRIDES``).
    ``stop_signals``: a list that signal handlers installed earlier (the CLI's, during its imports) append to;
    a signal in it stops the run at the first safe point, as one received during training does.
    """

    def __init__(self, cfg: TrainConfig, resume: str | os.PathLike | None = None, progress: bool = True,
                 stop_after_steps: int | None = None, overwrite: bool = False, overrides: list[str] | None = None,
                 stop_signals: list[int] | None = None):
        self.resume_from = None
        self._resume_meta: dict | None = None
        if resume is not None:
            self.resume_from = find_resumable(Path(resume))
            if self.resume_from is None:
                raise UserInputError(f"--resume {resume}: no complete checkpoint (last/{STATE_JSON}) found there")
            saved = _read_state_json(self.resume_from)
            self._resume_meta = saved
            data = saved["config"]
            if overrides:
                changes = parse_overrides(overrides)
                refused = sorted(item.split("=", 1)[0].strip() for item in overrides
                                 if item.split("=", 1)[0].strip() not in RESUME_OVERRIDES)
                if refused:
                    raise UserInputError(
                        f"--resume {resume}: {', '.join(refused)} cannot change on resume (the run continues with "
                        f"its saved config); only its budget can: {', '.join(RESUME_OVERRIDES)}")
                data = _merge(data, changes)
            cfg = config_from_dict(data)
            if cfg.out_dir != str(resume):
                cfg.out_dir = str(resume)
        elif overrides:
            raise UserInputError("overrides apply to a resumed run only; put them into the config of a new run")
        if resume is not None and overwrite:
            raise UserInputError("--overwrite starts a new run in place of an old one, --resume continues it: give one")
        self.cfg = cfg
        self.progress = progress
        self.overwrite = overwrite
        self.stop_after_steps = stop_after_steps  # tests: simulate an interruption after this many steps
        self._signals: list[int] = stop_signals if stop_signals is not None else []

    @property
    def _stop_signal(self) -> int | None:
        return self._signals[0] if self._signals else None

    # ........................................................ set-up helpers
    def _device(self) -> torch.device:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.cfg.device != "auto":
            device = torch.device(self.cfg.device)
            # a bare "cuda" under torchrun means this process's own GPU
            return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")

    def _precision(self, device: torch.device) -> str:
        p = self.cfg.precision
        if p == "auto":  # the release's fp16 autocast with a grad scaler on GPUs (SPEC section 5)
            return "fp16" if device.type == "cuda" else "fp32"
        if p == "fp16" and device.type != "cuda":
            raise UserInputError("precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        if p not in ("fp32", "bf16", "fp16"):
            raise UserInputError(f"precision={p!r}: expected auto, fp32, bf16 or fp16")
        return p

    def _autocast(self, device, precision):
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)

    @staticmethod
    def _seed_all(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)

    def _lr_factor(self, epoch: int) -> float:
        o = self.cfg.optim
        return o.decay_factor ** sum(1 for e in o.decay_epochs if epoch >= e)

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:
            raise KeyboardInterrupt
        self._signals.append(signum)
        log.warning("signal %d: stopping at the next safe point (after the current step or the set-up), "
                    "then saving a checkpoint; a second one stops at once", signum)

    # ................................................................ saving
    def _save_state(self, name: str, model, opt, scaler, st: dict) -> None:
        if not self.dist.is_main:
            return
        from safetensors.torch import save_file

        def write(folder: Path):
            save_checkpoint(model, folder)
            tensors, opt_meta = _optimizer_to_files(opt)
            tensors["rng.torch"] = torch.get_rng_state()
            save_file(tensors, str(folder / STATE_TENSORS))
            np_state = np.random.get_state()
            meta = {
                "config": self.cfg.to_dict(),
                "optimizer": opt_meta,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
                        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
                **st,
            }
            meta["world_size"] = self.dist.world_size
            (folder / STATE_JSON).write_text(json.dumps(meta, indent=1))

        _atomic_dir_write(self.run_dir / name, write)

    def _load_state(self, model, opt, scaler) -> dict:
        from safetensors.torch import load_file

        folder = self.resume_from
        load_weights(model, folder)
        meta = _read_state_json(folder)
        if meta.get("world_size", 1) != self.dist.world_size:
            raise UserInputError(
                f"{folder}: the run was saved with {meta.get('world_size', 1)} process(es); resume it with the same "
                f"number (now {self.dist.world_size}) so that the data order continues exactly")
        try:
            tensors = load_file(str(folder / STATE_TENSORS))
            opt.load_state_dict(_optimizer_from_files(tensors, meta["optimizer"]))
        except Exception as exc:
            raise CheckpointError(f"{folder / STATE_TENSORS}: optimiser state unreadable or of another model ({exc})") from exc
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        torch.set_rng_state(tensors["rng.torch"])
        py = meta["rng"]["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npst = meta["rng"]["numpy"]
        np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
        log.info("resumed from %s at step %d (epoch %d, batch %d)", folder, meta["step"], meta["epoch"], meta["batch_in_epoch"])
        return meta

    def _small_compute(self, model, bench):
        """Freeze the backbone and attach the feature cache as the config asks; returns the cache or None."""
        from offset_cir.train.cache import setup_small_compute

        return setup_small_compute(self.cfg, model, bench, progress=self.progress and self.dist.is_main)

    # .............................................................. evaluate
    def _evaluate(self, model, bench) -> dict | None:
        from offset_cir.eval.evaluate import evaluate

        if not self.dist.is_main:
            return None
        cfg = self.cfg
        result = evaluate(model, bench, cfg.data.protocol, split=cfg.data.val_split, batch_size=cfg.eval_batch_size,
                          num_workers=cfg.data.num_workers, progress=self.progress)
        if cfg.selection:
            result["selection_score"] = sum(result["metrics"][k] for k in cfg.selection)
            result["selection_rule"] = " + ".join(cfg.selection)
        return result

    # ............................................................ run folder
    def _finished_reason(self, st: dict) -> tuple[str, str] | None:
        """(what ended the run, the key that raises that budget) when a saved state has used up the budget."""
        cfg = self.cfg
        if cfg.max_steps and st["step"] >= cfg.max_steps:
            return f"max_steps={cfg.max_steps} reached", "max_steps"
        if st["epoch"] >= cfg.epochs:
            return f"epochs={cfg.epochs} done", "epochs"
        if cfg.time_budget_minutes and st.get("elapsed_s", 0.0) >= cfg.time_budget_minutes * 60:
            return f"time_budget_minutes={cfg.time_budget_minutes:g} used", "time_budget_minutes"
        patience = cfg.early_stop_patience
        if patience is not None and st.get("evals_since_best", 0) >= patience:
            return (f"early stopping after {st['evals_since_best']} evaluations without improvement "
                    f"(early_stop_patience={patience})"), "early_stop_patience"
        return None

    def _already_finished(self, reason: str, key: str) -> dict:
        st = self._resume_meta
        if self.dist.is_main:
            log.warning("%s: the run is already finished (%s at step %d): nothing to train, nothing changed. To train "
                        "it further, raise that budget: `offset train --resume %s %s=...`",
                        self.run_dir, reason, st["step"], self.run_dir, key)
        return {"name": self.cfg.name, "stopped": "already finished", "reason": reason, "steps": st["step"],
                "epochs": st["epoch"], "best_score": st.get("best_score"), "best_step": st.get("best_step"),
                "history": st.get("history", []), "seconds": 0.0, "run_dir": str(self.run_dir),
                "triplets": 0, "triplets_per_s": 0.0}

    def _check_run_dir(self, device) -> None:
        """A new run never mixes with, or replaces, another one in its folder unless asked (``overwrite``)."""
        run_dir = self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise UserInputError(f"out_dir {run_dir} is a file, not a folder: choose another out_dir=FOLDER")
        held = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
        if any_rank(bool(held) and not self.overwrite, self.dist, device):
            shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
            raise UserInputError(
                f"out_dir {run_dir} is not empty (it holds {shown or 'files'}): continue the run there with "
                f"`offset train --resume {run_dir}`, train into another folder (out_dir=NEW_FOLDER), or give "
                f"--overwrite to replace it")

    def _make_run_dir(self) -> None:
        run_dir = self.run_dir
        if self.resume_from is None and self.overwrite and run_dir.is_dir():
            removed = [name for name in RUN_OUTPUTS if (run_dir / name).exists() or (run_dir / name).is_symlink()]
            for name in removed:
                path = run_dir / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            if removed:
                log.warning("--overwrite: removed the previous run's %s from %s", ", ".join(removed), run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(_to_yaml(self.cfg.to_dict()))

    def _interrupted_in_setup(self, st: dict) -> dict:
        if self.dist.is_main:
            if self.resume_from is None:
                log.warning("interrupted during the set-up: nothing trained, nothing written")
            else:
                log.warning("interrupted during the set-up: %s is unchanged (step %d); continue with "
                            "`offset train --resume %s`", self.resume_from, st["step"], self.run_dir)
        return {"name": self.cfg.name, "stopped": "interrupted", "steps": st["step"], "epochs": st["epoch"],
                "best_score": st["best_score"], "best_step": st["best_step"], "history": st["history"],
                "seconds": 0.0, "run_dir": str(self.run_dir), "triplets": 0, "triplets_per_s": 0.0}

    def _draw_curves(self, metrics_path: Path) -> None:
        if not self.dist.is_main or not metrics_path.is_file():
            return
        try:
            plot_curves(metrics_path, self.run_dir / CURVES_NAME, title=self.cfg.name)
        except Exception as exc:  # a figure must never stop a run
            log.warning("%s not drawn (%s)", self.run_dir / CURVES_NAME, exc)

    # ................................................................... fit
    def fit(self) -> dict:
        # Signal handlers first: a SIGINT/SIGTERM that arrives during the slow set-up (process group, model,
        # data) is remembered and acted on at the first safe point, never lost.
        with stop_signals_handled_by(self._on_signal):
            return self._fit()

    def _fit(self) -> dict:
        from offset_cir.data import collate, get_dataset
        from offset_cir.model.offset import OFFSET

        cfg = self.cfg
        device = self._device()
        self.dist = dist = init_distributed(device.type)
        precision = self._precision(device)
        self.run_dir = Path(cfg.out_dir)
        if self.resume_from is not None:
            finished = self._finished_reason(self._resume_meta)
            if finished:
                return self._already_finished(*finished)
        else:
            self._check_run_dir(device)
        # The data before anything is written: a wrong data.root leaves no run folder behind.
        bench = open_benchmark(cfg, get_dataset)
        self._seed_all(cfg.seed)
        model_cfg = cfg.model if self.resume_from is None else dataclasses.replace(cfg.model, pretrained=None)
        model = OFFSET(model_cfg).to(device)
        model.config = cfg.model
        cache = self._small_compute(model, bench)  # freeze_backbone / feature_cache
        groups = model.parameter_groups(cfg.optim.backbone_lr, cfg.optim.new_lr, cfg.optim.weight_decay)
        for g in groups:
            g["initial_lr"] = g["lr"]
        opt = torch.optim.AdamW(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        st = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_score": None, "best_step": None,
              "evals_since_best": 0, "history": [], "elapsed_s": 0.0}
        if self.resume_from is not None:
            meta = self._load_state(model, opt, scaler)
            st.update({k: meta[k] for k in st if k in meta})

        # a feature cache holds the evaluation transform only: no random crops then
        train_set = bench.triplets(cfg.data.train_split, model.preprocess, train=cache is None,
                                   load_masks=model.needs_masks)
        sampler = EpochSampler(len(train_set), cfg.seed, cfg.batch_size * dist.world_size, dist.rank, dist.world_size)
        loader_kw = dict(batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
                         persistent_workers=False, pin_memory=device.type == "cuda")
        steps_per_epoch = sampler.per_rank() // cfg.batch_size // cfg.optim.grad_accum
        if steps_per_epoch < 1:
            raise UserInputError("fewer training batches than optim.grad_accum: lower grad_accum or batch_size")

        train_model = model
        if dist.enabled:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        gather = gather_with_grad if (dist.enabled and cfg.gather_features) else None
        # The first safe point: a signal received during the set-up stops here, before anything is written
        # (a new run leaves no folder, a resumed one keeps its checkpoint as it was).
        if any_rank(self._stop_signal is not None, dist, device):
            return self._interrupted_in_setup(st)
        if dist.is_main:
            self._make_run_dir()
        writer = self._tensorboard() if dist.is_main else None
        metrics_path = self.run_dir / "metrics.jsonl"
        started = time.monotonic() - st["elapsed_s"]
        loop_started, eval_s, triplets_seen = time.monotonic(), 0.0, 0  # this invocation's throughput
        budget_s = cfg.time_budget_minutes * 60 if cfg.time_budget_minutes else None
        stop_reason = None
        if dist.is_main:
            log.info("training %s: %s on %s (%s), %d triplets, %d steps/epoch, global batch %d, %d process(es)",
                     cfg.name, cfg.model.backbone, device, precision, len(train_set), steps_per_epoch,
                     cfg.batch_size * dist.world_size, dist.world_size)

        def log_row(row: dict) -> None:
            if dist.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")

        def do_eval() -> bool:
            """Evaluate, keep the best; True when early stopping says stop."""
            nonlocal eval_s
            eval_started = time.monotonic()
            result = self._evaluate(model, bench)
            stop = False
            if dist.is_main and result is not None:
                score = result["selection_score"]
                row = {"step": st["step"], "epoch": st["epoch"], "eval": result["metrics"], "selection": score}
                st["history"].append(row)
                log_row(row)
                self._draw_curves(metrics_path)
                if writer:
                    for k, v in result["metrics"].items():
                        writer.add_scalar(f"val/{k}", v, st["step"])
                if st["best_score"] is None or score > st["best_score"]:
                    st.update(best_score=score, best_step=st["step"], evals_since_best=0)

                    def write_best(folder: Path) -> None:
                        save_checkpoint(model, folder, extra={"selection_score": score, "step": st["step"], "result": result})

                    _atomic_dir_write(self.run_dir / "best", write_best)
                    tmp = self.run_dir / ".best_result.json.tmp"
                    tmp.write_text(json.dumps(result, indent=2))
                    os.replace(tmp, self.run_dir / "best_result.json")
                else:
                    st["evals_since_best"] += 1
                log.info("eval step %d: selection %.2f (best %.2f at step %s)", st["step"], score, st["best_score"], st["best_step"])
                p = cfg.early_stop_patience
                stop = p is not None and st["evals_since_best"] >= p
            eval_s += time.monotonic() - eval_started
            return any_rank(stop, dist, device)  # only rank 0 evaluates: share its decision

        model.train()
        try:
            while st["epoch"] < cfg.epochs and stop_reason is None:
                epoch = st["epoch"]
                factor = self._lr_factor(epoch)
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * factor
                sampler.set_epoch(epoch, skip=st["batch_in_epoch"] * cfg.batch_size)
                loader = DataLoader(SeededItems(train_set, cfg.seed), **loader_kw)
                bar = None
                if self.progress and dist.is_main:
                    from tqdm import tqdm

                    bar = tqdm(total=steps_per_epoch, initial=st["batch_in_epoch"] // cfg.optim.grad_accum,
                               desc=f"{cfg.name} epoch {epoch}", unit="step", leave=False, dynamic_ncols=True)
                t_last, n_last = time.monotonic(), 0
                micro = 0
                opt.zero_grad(set_to_none=True)
                for batch in loader:
                    # DDP all-reduces gradients in the backward pass: only the step's last micro-batch needs it, the
                    # others accumulate locally (no_sync around their forward and backward).
                    accumulating = dist.enabled and micro + 1 < cfg.optim.grad_accum
                    with train_model.no_sync() if accumulating else contextlib.nullcontext():
                        with self._autocast(device, precision):
                            q, k, f_t = train_model(
                                batch["ref_image"].to(device, non_blocking=True), _masks(batch["ref_mask"], device),
                                batch["text"], batch["tgt_image"].to(device, non_blocking=True), _masks(batch["tgt_mask"], device))
                        losses = model.loss_from_features(q, k, f_t, gather)
                        loss = losses["total"] / cfg.optim.grad_accum
                        finite = not any_rank(not bool(torch.isfinite(losses["total"]).item()), dist, device)
                        if not finite:
                            raise TrainingError(
                                f"non-finite loss at step {st['step']} (epoch {epoch}): total={losses['total'].item()}, "
                                f"bbc={losses['bbc'].item()}, fr={losses['fr'].item()}. Training stopped; the last good "
                                f"checkpoint in {self.run_dir / 'last'} is kept. Lower the learning rates or use fp32.")
                        if scaler is not None:
                            scaler.scale(loss).backward()
                        else:
                            loss.backward()
                    micro += 1
                    st["batch_in_epoch"] += 1
                    n_last += batch["ref_image"].shape[0]
                    triplets_seen += batch["ref_image"].shape[0] * dist.world_size
                    if micro < cfg.optim.grad_accum:
                        continue
                    micro = 0
                    if cfg.optim.max_grad_norm:
                        if scaler is not None:
                            scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                    if scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                    st["step"] += 1
                    st["elapsed_s"] = time.monotonic() - started
                    if bar is not None:
                        bar.update(1)
                    if st["step"] % cfg.log_every_steps == 0 or st["step"] == 1:
                        now = time.monotonic()
                        speed = n_last * dist.world_size / max(now - t_last, 1e-9)
                        t_last, n_last = now, 0
                        row = {"step": st["step"], "epoch": epoch, "loss": losses["total"].item(),
                               "bbc": losses["bbc"].item(), "fr": losses["fr"].item(),
                               "lr_backbone": opt.param_groups[0]["lr"], "lr_new": opt.param_groups[1]["lr"],
                               "triplets_per_s": speed, "elapsed_s": st["elapsed_s"]}
                        log_row(row)
                        if writer:
                            for key in ("loss", "bbc", "fr", "triplets_per_s"):
                                writer.add_scalar(f"train/{key}", row[key], st["step"])
                        if bar is not None:
                            bar.set_postfix(loss=f"{row['loss']:.3f}", trip_s=f"{speed:.0f}")
                    if cfg.save_every_steps and st["step"] % cfg.save_every_steps == 0:
                        self._save_state("last", model, opt, scaler, st)
                    if cfg.eval_every_steps and st["step"] % cfg.eval_every_steps == 0 and do_eval():
                        stop_reason = "early stop"
                    if cfg.max_steps and st["step"] >= cfg.max_steps:
                        stop_reason = stop_reason or "max_steps"
                    # Clocks and signals differ between ranks: every rank must take the same decision.
                    out_of_time = any_rank(bool(budget_s) and time.monotonic() - started >= budget_s, dist, device)
                    if out_of_time:
                        stop_reason = stop_reason or "time budget"
                    if any_rank(self._stop_signal is not None, dist, device):
                        stop_reason = "interrupted"
                    if self.stop_after_steps is not None and st["step"] >= self.stop_after_steps:
                        stop_reason = "interrupted"
                    if stop_reason:
                        break
                if bar is not None:
                    bar.close()
                if stop_reason == "interrupted":
                    break
                end_of_epoch = stop_reason is None
                if end_of_epoch:
                    st["epoch"] += 1
                    st["batch_in_epoch"] = 0
                    if cfg.eval_every_epochs and st["epoch"] % cfg.eval_every_epochs == 0 and do_eval():
                        stop_reason = "early stop"
                    self._save_state("last", model, opt, scaler, st)
            if stop_reason is None:
                stop_reason = "epochs done"
            if stop_reason in ("max_steps", "time budget") and not cfg.eval_every_steps:
                do_eval()  # the run ends mid-epoch: evaluate what it reached
            st["elapsed_s"] = time.monotonic() - started  # a resume then knows whether the time budget is used
            self._save_state("last", model, opt, scaler, st)
            barrier(dist)
        finally:
            if writer:
                writer.close()
        train_s = max(time.monotonic() - loop_started - eval_s, 1e-9)
        summary = {"name": cfg.name, "stopped": stop_reason, "steps": st["step"], "epochs": st["epoch"],
                   "best_score": st["best_score"], "best_step": st["best_step"], "history": st["history"],
                   "seconds": time.monotonic() - started, "run_dir": str(self.run_dir),
                   # this invocation's throughput: triplets through forward and backward per second of training
                   # (evaluation excluded), all processes together
                   "triplets": triplets_seen, "train_seconds": train_s, "triplets_per_s": triplets_seen / train_s}
        if dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self._draw_curves(metrics_path)
            speed = f"{summary['triplets_per_s']:.1f} triplets/s ({triplets_seen} triplets in {train_s:.1f} s of training)"
            if stop_reason == "interrupted":
                log.warning("interrupted at step %d: checkpoint saved; %s; continue with `offset train --resume %s`",
                            st["step"], speed, self.run_dir)
            else:
                log.info("%s stopped (%s) at step %d: %s; best selection %s at step %s", cfg.name, stop_reason,
                         st["step"], speed, st["best_score"], st["best_step"])
        return summary

    def _tensorboard(self):
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as exc:  # tensorboard missing: JSONL still has everything
            log.warning("TensorBoard logging off (%s)", exc)
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))


def _read_state_json(folder: Path) -> dict:
    path = folder / STATE_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable trainer state ({exc}); the weights in {folder} are still usable "
                              "with `offset eval --checkpoint`") from exc
    missing = [k for k in ("config", "optimizer", "rng", "step", "epoch", "batch_in_epoch") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: trainer state lacks the fields {missing}")
    return meta


def open_benchmark(cfg: TrainConfig, get_dataset):
    """The training benchmark; a missing ``data.root`` is named with how to make or get the data."""
    root = Path(cfg.data.root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        if cfg.data.dataset.lower() == "synthetic":
            how = f"make the synthetic benchmark there with `offset synth --out {root}`"
        else:
            how = (f"point data.root=FOLDER at the {cfg.data.dataset} benchmark (`offset doctor {cfg.data.dataset} "
                   f"--root FOLDER` checks one)")
        raise DatasetError(f"data.root={root} {what}: {how}, or set data.root=FOLDER to where the data is")
    return get_dataset(cfg.data.dataset, cfg.data.root, **cfg.data.settings)


def plot_curves(metrics_path: Path, png: Path, title: str = "") -> None:
    """Training losses and validation metrics of ``metrics.jsonl`` drawn to ``png``, written whole or not at all
    (a temporary file renamed over it: a crash never leaves half a PNG)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if isinstance(r.get("eval"), dict)]
    fig = Figure(figsize=(12, 4.2), dpi=100)
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
    tmp = png.with_name(png.stem + ".tmp.png")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, png)
    finally:
        tmp.unlink(missing_ok=True)


def _masks(t: torch.Tensor, device) -> torch.Tensor | None:
    return None if t.numel() == 0 else t.to(device, non_blocking=True)


def _to_yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False)


def train(cfg: TrainConfig, resume=None, progress: bool = True, overwrite: bool = False) -> dict:
    return Trainer(cfg, resume=resume, progress=progress, overwrite=overwrite).fit()
