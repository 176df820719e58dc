"""The training loop (docs/model.md#training): set-up, steps and after-step (log, save, evaluate, stop) of one run.

What it runs: AdamW with two parameter groups, step decay, accumulation, autocast, evaluation and early stopping,
atomic resumable checkpoints, and DistributedDataParallel under torchrun.

Data order and augmentation are deterministic: the sampler permutes indices with a generator seeded by
(seed, epoch), and every item's random crop is drawn from an RNG seeded by (seed, epoch, index). So a run
that is interrupted and resumed sees exactly the data an uninterrupted run sees, and N processes with batch B
see the same triplets as one process with batch N*B.

``Trainer.fit`` is a set-up (``_set_up``: device, process group, data, model, optimiser, resumed state, run
folder), then epochs of steps (``_train_epoch``: ``_forward_backward`` per micro-batch, ``_optimizer_step``), each
step followed by ``_after_step`` (log, save, evaluate, decide whether to stop), and an end (``_end``,
``_summary``). Epochs count from 1 wherever a person reads them (the config's ``optim.decay_epochs_1based``, the
log, metrics.jsonl, the progress bar). The data order lives in :mod:`offset_cir.train.sampling`, the run's state
and its folders in :mod:`offset_cir.train.state`, the best evaluation and the budgets in
:mod:`offset_cir.train.selection`, the precision in :mod:`offset_cir.train.precision`, what a run logs in
:mod:`offset_cir.train.run_log`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from offset_cir.data.common import ItemSeededDataset
from offset_cir.device import choose_device
from offset_cir.errors import DatasetError, TrainingError, UserInputError
from offset_cir.io import write_json
from offset_cir.train.config import TrainConfig, to_yaml
from offset_cir.train.curves import plot_curves
from offset_cir.train.run_log import RunLog, check_train_extras
from offset_cir.distributed import any_rank, barrier, gather_with_grad, init_distributed
from offset_cir.train.precision import autocast, training_precision
from offset_cir.train.sampling import EpochSampler
from offset_cir.train.selection import (STOPPED_BY, budget_reason, budget_used, max_steps_out_of_reach,
                                        patience_used, record_evaluation)
from offset_cir.train.signals import stop_signals_handled_by
from offset_cir.train.state import (RESUME_OVERRIDES, TrainState, load_training_state, make_run_dir,
                                    occupied, read_resumable, refuse_occupied_run_dir, save_best,
                                    save_training_state)

__all__ = ["Trainer", "train", "open_benchmark", "plot_curves", "EpochSampler", "TrainState", "RESUME_OVERRIDES"]

log = logging.getLogger(__name__)

_ENDS_EPOCH = ("max_steps", "time budget")  # a budget that ends a run at an epoch's last step ends that epoch first

# --------------------------------------------------------------------- trainer
class Trainer:
    """``Trainer(cfg).fit()``; ``Trainer(cfg, resume=run_dir)`` continues an interrupted run.

    ``overwrite``: a new run may replace the run already in ``cfg.out_dir`` (refused otherwise).
    ``overrides``: on resume, ``key=value`` changes of the budget only (``RESUME_OVERRIDES``).
    ``stop_signals``: a list that signal handlers installed earlier (the CLI's, during its imports) append to;
    a signal in it stops the run at the first safe point, as one received during training does.
    ``callbacks``: called with the trainer after every optimiser step (``trainer.state`` says where the run is);
    one may call :meth:`request_stop`.
    """

    def __init__(self, cfg: TrainConfig, resume: str | os.PathLike | None = None, progress: bool = True,
                 overwrite: bool = False, overrides: list[str] | None = None, stop_signals: list[int] | None = None,
                 callbacks: Sequence[Callable[["Trainer"], None]] = ()):
        self.resume_from = None
        self._resume_state: TrainState | None = None
        if resume is not None:
            self.resume_from, self._resume_state, cfg = read_resumable(resume, overrides)
        elif overrides:
            raise UserInputError("overrides apply to a resumed run only; put them into the config of a new run")
        if resume is not None and overwrite:
            raise UserInputError("--overwrite starts a new run in place of an old one, --resume continues it: give one")
        self.cfg = cfg
        self.progress = progress
        self.overwrite = overwrite
        self.callbacks = list(callbacks)
        self._signals: list[int] = stop_signals if stop_signals is not None else []
        self._stop_requested = False

    @property
    def _stop_signal(self) -> int | None:
        return self._signals[0] if self._signals else None

    def request_stop(self) -> None:
        """Stop at the next safe point (after the current step), save ``last/`` and end as "interrupted", as a
        SIGINT does: ``offset train --resume`` continues the run."""
        self._stop_requested = True

    # ........................................................ set-up helpers
    @staticmethod
    def _seed_all(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:
            raise KeyboardInterrupt
        self._signals.append(signum)
        log.warning("signal %d: stopping at the next safe point (after the current step or the set-up), "
                    "then saving a checkpoint; a second one stops at once", signum)

    def _small_compute(self, model, bench):
        """Freeze the backbone and attach the feature cache as the config asks; returns the cache or None."""
        from offset_cir.train.cache import setup_small_compute

        return setup_small_compute(self.cfg, model, bench, progress=self.progress and self.dist.is_main)

    # ............................................................ run folder
    def _already_finished(self, reason: str, key: str) -> dict:
        st = self._resume_state
        if self.dist.is_main:
            log.warning("%s: the run is already finished (%s): nothing to train, nothing changed. To train it "
                        "further, raise that budget: `offset train --resume %s %s=...`", self.run_dir, reason,
                        self.run_dir, key)
        return self._summary_of("already finished", st, reason=reason, ended_by=key)

    def _interrupted_in_setup(self) -> dict:
        st = self.state
        if self.dist.is_main:
            if self.resume_from is None:
                log.warning("interrupted during the set-up: nothing trained, nothing written")
            else:
                log.warning("interrupted during the set-up: %s is unchanged (step %d); continue with "
                            "`offset train --resume %s`", self.resume_from, st.step, self.run_dir)
        return self._summary_of("interrupted", st)

    def _summary_of(self, stopped: str, st: TrainState, **more) -> dict:
        """The summary's fields: how the run stopped, where it is, and the whole run's throughput (every invocation
        of it: ``TrainState.throughput``); ``more`` adds or replaces some."""
        return {"name": self.cfg.name, "stopped": stopped, "ended_by": None, "reason": stopped, "steps": st.step,
                "epochs": st.epoch, "clipseg_maps": self.cfg.data.clipseg_maps, "best_score": st.best_score,
                "best_step": st.best_step, "history": st.history, "run_dir": str(self.run_dir), **st.throughput(),
                **more}

    # ................................................................... fit
    def fit(self) -> dict:
        # Signal handlers first: a SIGINT/SIGTERM that arrives during the slow set-up (process group, model,
        # data) is remembered and acted on at the first safe point, never lost.
        with stop_signals_handled_by(self._on_signal):
            return self._fit()

    def _fit(self) -> dict:
        ended_early = self._set_up()
        if ended_early is not None:
            return ended_early
        stop_reason = None
        self.model.train()
        try:
            while self.state.epoch < self.cfg.epochs and stop_reason is None:
                stop_reason = self._train_epoch()
                if stop_reason == "interrupted":
                    break
                if stop_reason is None or (stop_reason in _ENDS_EPOCH  # the epoch ran to its end
                                           and self.state.batch_in_epoch >= self.batches_per_epoch):
                    stop_reason = self._after_epoch() or stop_reason
            stop_reason = stop_reason or "epochs done"
            self._end(stop_reason)
        finally:
            self.run_log.close()
        return self._summary(stop_reason)

    # ................................................................ set-up
    def _set_up(self) -> dict | None:
        """Everything before the first step. Returns the summary of a run that ends here (already finished, or
        interrupted during the set-up), else None with the trainer ready to train."""
        cfg = self.cfg
        self.device = device = choose_device(cfg.device, what="device")
        self.dist = dist = init_distributed(device.type)
        self.precision = training_precision(cfg.precision, device)
        self.run_dir = Path(cfg.out_dir)
        if self.resume_from is not None:
            finished = budget_used(cfg, self._resume_state)
            if finished:
                return self._already_finished(*finished)
        curves = check_train_extras(cfg.tensorboard)
        if self.resume_from is None:
            refuse_occupied_run_dir(self.run_dir, any_rank(not self.overwrite and bool(occupied(self.run_dir)),
                                                            dist, device))
        # The data before anything is written: a wrong data.root leaves no run folder behind.
        from offset_cir.data import get_dataset

        self.bench = open_benchmark(cfg, get_dataset)
        cache = self._build_model()
        self._set_up_data(train_transform=cache is None)
        self.train_model = self.model
        if dist.enabled:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.gather = gather_with_grad if (dist.enabled and cfg.gather_features) else None
        # The first safe point: a signal received during the set-up stops here, before anything is written
        # (a new run leaves no folder, a resumed one keeps its checkpoint as it was).
        self.run_log = RunLog(self.run_dir, cfg.name, enabled=dist.is_main, curves=curves)
        if any_rank(self._stop_signal is not None, dist, device):
            return self._interrupted_in_setup()
        if dist.is_main:
            make_run_dir(self.run_dir, to_yaml(cfg.to_dict()), replace=self.resume_from is None and self.overwrite)
        if self.resume_from is not None:  # the rows a killed process wrote after the checkpoint go
            self.run_log.resume(self.state)
        if cfg.tensorboard:
            self.run_log.open_tensorboard()
        self.started = time.monotonic() - self.state.elapsed_s  # the run's clock, over all its invocations
        self.budget_s = cfg.time_budget_minutes * 60 if cfg.time_budget_minutes else None
        self._last_eval_step = None
        if dist.is_main:
            log.info("training %s: %s on %s (%s), %d triplets, %d steps/epoch, global batch %d, %d process(es)",
                     cfg.name, cfg.model.backbone, device, self.precision, len(self.train_set), self.steps_per_epoch,
                     cfg.batch_size * dist.world_size, dist.world_size)
            if out_of_reach := max_steps_out_of_reach(cfg, self.state, self.steps_per_epoch):
                log.warning(out_of_reach)
        return None

    def _build_model(self):
        """The model (with its small-compute set-up), the optimiser, the grad scaler and the state, resumed when
        asked; returns the feature cache or None."""
        from offset_cir.model.offset import OFFSET

        cfg = self.cfg
        self._seed_all(cfg.seed)
        # a resumed run's weights come from its last/ folder: build the architecture without downloading any
        model = OFFSET(cfg.model, load_weights=self.resume_from is None).to(self.device)
        cache = self._small_compute(model, self.bench)  # freeze_backbone / feature_cache
        groups = model.parameter_groups(cfg.optim.backbone_lr, cfg.optim.new_lr, cfg.optim.weight_decay)
        for g in groups:
            g["initial_lr"] = g["lr"]
        self.model = model
        # the fused kernel (one pass over all parameters): the same update as the per-tensor loop, faster
        # (benchmarks/train_speed.py --optimizer measures it); torch's default elsewhere
        fused = self.device.type in ("cpu", "cuda")
        self.opt = torch.optim.AdamW(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=fused or None)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.state = TrainState()
        if self.resume_from is not None:
            self.state = load_training_state(self.resume_from, model, self.opt, self.scaler, self.dist.world_size)
        return cache

    def _set_up_data(self, train_transform: bool) -> None:
        """The training split, its sampler and the DataLoader's settings."""
        from offset_cir.data import collate

        cfg, dist = self.cfg, self.dist
        # a feature cache holds the evaluation transform only: no random crops then
        self.train_set = self.bench.triplets(cfg.data.train_split, self.model.preprocess, train=train_transform,
                                             use_masks=self.model.uses_masks)
        self.sampler = EpochSampler(len(self.train_set), cfg.seed, cfg.batch_size * dist.world_size, dist.rank,
                                    dist.world_size, keep_partial=cfg.keep_partial_batch)
        self.loader_kw = dict(batch_size=cfg.batch_size, sampler=self.sampler, collate_fn=collate,
                              num_workers=cfg.data.num_workers, persistent_workers=False,
                              pin_memory=self.device.type == "cuda")
        # a last, smaller batch is one more batch; an accumulation an epoch's end leaves incomplete is not stepped
        self.batches_per_epoch = -(-self.sampler.per_rank() // cfg.batch_size)
        self.steps_per_epoch = self.batches_per_epoch // cfg.optim.grad_accum
        if self.steps_per_epoch < 1:
            raise UserInputError("fewer training batches than optim.grad_accum: lower grad_accum or batch_size")

    # ................................................................. steps
    def _train_epoch(self) -> str | None:
        """The current epoch (its rest, on resume): why the run stops, or None when the epoch ran to its end."""
        cfg, st = self.cfg, self.state
        epoch = st.epoch
        factor = cfg.optim.lr_factor(epoch + 1)  # epochs count from 1 in the config, the logs and metrics.jsonl
        for g in self.opt.param_groups:
            g["lr"] = g["initial_lr"] * factor
        if self.dist.is_main:
            log.info("epoch %d/%d: lr backbone %.3g, new modules %.3g", epoch + 1, cfg.epochs,
                     self.opt.param_groups[0]["lr"], self.opt.param_groups[1]["lr"])
        self.sampler.set_epoch(epoch, skip=st.batch_in_epoch * cfg.batch_size)
        loader = DataLoader(ItemSeededDataset(self.train_set, cfg.seed), **self.loader_kw)
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.steps_per_epoch, initial=st.batch_in_epoch // cfg.optim.grad_accum,
                       desc=f"{cfg.name} epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False, dynamic_ncols=True)
        self._speed_since, self._triplets_since = time.monotonic(), 0  # this process's, since the last log row
        micro, stop_reason = 0, None
        self.opt.zero_grad(set_to_none=True)
        for batch in loader:
            losses = self._forward_backward(batch, micro)
            micro += 1
            st.batch_in_epoch += 1
            self._triplets_since += batch["ref_image"].shape[0]
            st.triplets += batch["ref_image"].shape[0] * self.dist.world_size
            if micro < cfg.optim.grad_accum:
                continue
            micro = 0
            self._optimizer_step()
            if bar is not None:
                bar.update(1)
            stop_reason = self._after_step(losses, bar)
            # a budget used up by the epoch's last step ends the epoch first (the micro-batches left over, too few
            # for a step, are read as an uninterrupted run reads them): the epoch is done, not to be resumed
            if stop_reason and not (stop_reason in _ENDS_EPOCH and st.batch_in_epoch + cfg.optim.grad_accum
                                    > self.batches_per_epoch):
                break
        if bar is not None:
            bar.close()
        return stop_reason

    def _forward_backward(self, batch: dict, micro: int) -> dict:
        """Forward and backward of one micro-batch (its gradient scaled for accumulation); returns its losses.
        A non-finite loss on any rank stops the run (``TrainingError``)."""
        cfg, dist, device = self.cfg, self.dist, self.device
        # DDP all-reduces gradients in the backward pass: only the step's last micro-batch needs it, the
        # others accumulate locally (no_sync around their forward and backward).
        accumulating = dist.enabled and micro + 1 < cfg.optim.grad_accum
        with self.train_model.no_sync() if accumulating else contextlib.nullcontext():
            with autocast(device, self.precision):
                q, k, f_t = self.train_model(
                    batch["ref_image"].to(device, non_blocking=True), _masks(batch["ref_mask"], device),
                    batch["text"], batch["tgt_image"].to(device, non_blocking=True), _masks(batch["tgt_mask"], device))
            # the losses' similarity matrices in fp32, or under the training autocast as the release computes them
            loss_precision = self.precision if cfg.loss_precision == "autocast" else "fp32"
            with autocast(device, loss_precision):
                losses = self.model.loss_from_features(q, k, f_t, self.gather)
            loss = losses["total"] / cfg.optim.grad_accum
            finite = not any_rank(not bool(torch.isfinite(losses["total"]).item()), dist, device)
            if not finite:
                raise TrainingError(
                    f"non-finite loss at step {self.state.step} (epoch {self.state.epoch + 1}): "
                    f"total={losses['total'].item()}, bbc={losses['bbc'].item()}, fr={losses['fr'].item()}. "
                    f"Training stopped; the last good checkpoint in {self.run_dir / 'last'} is kept. Lower the "
                    f"learning rates or use fp32.")
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        return losses

    def _optimizer_step(self) -> None:
        """Clip, step and zero the accumulated gradients; one more step done."""
        cfg, opt, scaler = self.cfg, self.opt, self.scaler
        if cfg.optim.max_grad_norm:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.elapsed_s = time.monotonic() - self.started

    # ............................................................ after-step
    def _after_step(self, losses: dict, bar=None) -> str | None:
        """Log, save and evaluate as the config asks after a step; why the run stops now, or None."""
        cfg, st = self.cfg, self.state
        for callback in self.callbacks:
            callback(self)
        if st.step % cfg.log_every_steps == 0 or st.step == 1:
            self._log_step(losses, bar)
        stop_reason = None
        if cfg.eval_every_steps and st.step % cfg.eval_every_steps == 0 and self._evaluate_and_keep_best():
            stop_reason = "early stop"
        if cfg.save_every_steps and st.step % cfg.save_every_steps == 0:
            self._save_last()  # after the step's evaluation: a checkpoint holds everything its step did
        return self._stop_reason(stop_reason)

    def _log_step(self, losses: dict, bar=None) -> None:
        """A training row of metrics.jsonl (and TensorBoard, and the progress bar)."""
        st, world = self.state, self.dist.world_size
        now = time.monotonic()
        speed = self._triplets_since * world / max(now - self._speed_since, 1e-9)
        self._speed_since, self._triplets_since = now, 0
        row = {"step": st.step, "epoch": st.epoch + 1, "loss": losses["total"].item(),
               "bbc": losses["bbc"].item(), "fr": losses["fr"].item(),
               "lr_backbone": self.opt.param_groups[0]["lr"], "lr_new": self.opt.param_groups[1]["lr"],
               "triplets_per_s": speed, "elapsed_s": st.elapsed_s}
        self.run_log.row(row, {f"train/{k}": row[k] for k in ("loss", "bbc", "fr", "triplets_per_s")}, st.step)
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.3f}", trip_s=f"{speed:.0f}")

    def _save_last(self) -> None:
        """``last/``: the resumable checkpoint (rank 0 writes it), with the run's clock and metrics.jsonl's rows."""
        self.state.elapsed_s = time.monotonic() - self.started
        self.state.metrics_rows = self.run_log.rows
        if self.dist.is_main:
            save_training_state(self.run_dir / "last", self.model, self.opt, self.scaler, self.cfg.to_dict(),
                                self.state, self.dist.world_size)

    def _evaluate(self) -> dict | None:
        from offset_cir.eval.evaluate import evaluate

        if not self.dist.is_main:
            return None
        cfg = self.cfg
        result = evaluate(self.model, self.bench, cfg.data.protocol, split=cfg.data.val_split,
                          batch_size=cfg.eval_batch_size, num_workers=cfg.data.num_workers, progress=self.progress)
        if cfg.selection:
            result["selection_score"] = sum(result["metrics"][k] for k in cfg.selection)
            result["selection_rule"] = " + ".join(cfg.selection)
        return result

    def _evaluate_and_keep_best(self) -> bool:
        """Evaluate (rank 0), keep the best in ``best/``; True on every rank when early stopping says stop."""
        eval_started = time.monotonic()
        st, cfg = self.state, self.cfg
        result = self._evaluate()
        stop = False
        if self.dist.is_main and result is not None:
            score = result["selection_score"]
            row = {"step": st.step, "epoch": st.epoch + 1, "eval": result["metrics"], "selection": score}
            st.history.append(row)
            self.run_log.row(row, {f"val/{k}": v for k, v in result["metrics"].items()}, st.step)
            self.run_log.draw_curves()
            if record_evaluation(st, score):  # strictly better: a tie keeps the earlier evaluation, as the release
                save_best(self.run_dir, self.model if cfg.save_best else None, score, st.step, result)
            log.info("eval after epoch %d (step %d): selection %.2f (best %.2f at step %s)", st.epoch + 1, st.step,
                     score, st.best_score, st.best_step)
            stop = patience_used(st, cfg.early_stop_patience)
        st.eval_s += time.monotonic() - eval_started
        self._last_eval_step = st.step
        return any_rank(stop, self.dist, self.device)  # only rank 0 evaluates: share its decision

    def _stop_reason(self, reason: str | None) -> str | None:
        """``reason`` (early stopping), or the budget that is used up, or an interruption; the same on every rank."""
        cfg, st, dist, device = self.cfg, self.state, self.dist, self.device
        if cfg.max_steps and st.step >= cfg.max_steps:
            reason = reason or "max_steps"
        # Clocks and signals differ between ranks: every rank must take the same decision.
        out_of_time = any_rank(bool(self.budget_s) and time.monotonic() - self.started >= self.budget_s, dist, device)
        if out_of_time:
            reason = reason or "time budget"
        if any_rank(self._stop_signal is not None or self._stop_requested, dist, device):
            reason = "interrupted"
        return reason

    def _after_epoch(self) -> str | None:
        """The epoch ran to its end: evaluate as the config asks and save ``last/``; "early stop" or None."""
        cfg, st = self.cfg, self.state
        stop_reason = None
        if cfg.eval_every_epochs and (st.epoch + 1) % cfg.eval_every_epochs == 0 and self._evaluate_and_keep_best():
            stop_reason = "early stop"
        st.epoch += 1
        st.batch_in_epoch = 0
        self._save_last()
        return stop_reason

    # ................................................................... end
    def _end(self, stop_reason: str) -> None:
        """Evaluate a run that ends on a budget mid-epoch (or at an epoch's end its evaluations skip), save
        ``last/`` (with the run's clock: a resume knows whether the time budget is used), wait for every rank."""
        if stop_reason in _ENDS_EPOCH and not self.cfg.eval_every_steps and self._last_eval_step != self.state.step:
            self._evaluate_and_keep_best()  # evaluate what the run reached
        self._save_last()
        barrier(self.dist)

    def _summary(self, stop_reason: str) -> dict:
        """The run's summary (written to summary.json by rank 0), with the curves drawn and the end logged: the
        budget that ended the run (``ended_by``: its config key; ``reason``: in words), the whole run's throughput."""
        cfg, st = self.cfg, self.state
        ended_by = {stopped: key for key, stopped in STOPPED_BY.items()}.get(stop_reason)
        reason = budget_reason(cfg, st, ended_by) if ended_by else f"interrupted at step {st.step}"
        summary = self._summary_of(stop_reason, st, ended_by=ended_by, reason=reason)
        if self.dist.is_main:
            write_json(self.run_dir / "summary.json", summary, indent=2)
            self.run_log.draw_curves()
            speed = (f"{summary['triplets_per_s']:.1f} triplets/s ({st.triplets} triplets in "
                     f"{summary['train_seconds']:.1f} s of training, whole run)")
            if stop_reason == "interrupted":
                log.warning("interrupted at step %d: checkpoint saved; %s; continue with `offset train --resume %s`",
                            st.step, speed, self.run_dir)
            else:
                log.info("%s ended by %s: %s; %s; best selection %s at step %s", cfg.name, ended_by, reason, speed,
                         st.best_score, st.best_step)
        return summary


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
    maps = {"clipseg_maps": cfg.data.clipseg_maps} if cfg.data.clipseg_maps else {}  # the release's CLIPSeg maps
    return get_dataset(cfg.data.dataset, cfg.data.root, **cfg.data.settings, **maps)


def _masks(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)


def train(cfg: TrainConfig, resume=None, progress: bool = True, overwrite: bool = False) -> dict:
    return Trainer(cfg, resume=resume, progress=progress, overwrite=overwrite).fit()
