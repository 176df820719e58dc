"""Trainer: config presets and overrides, resume equals uninterrupted, NaN stop, DDP equivalence (gloo)."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offset_cir.errors import TrainingError, UserInputError
from offset_cir.config_base import parse_overrides
from offset_cir.testing.training import SimulatedKill, die_after, stop_after
from offset_cir.train.config import TrainConfig, load_config, preset_names
from offset_cir.train.precision import training_precision
from offset_cir.train.sampling import EpochSampler
from offset_cir.train.state import TrainState
from offset_cir.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from offset_cir.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root / "bench", seed=3, image_size=64, n_train=32, n_val=8, n_test=8)
    return root / "bench"


def _cfg(root, out, *extra):
    return load_config("synthetic", [
        f"data.root={root}", f"out_dir={out}", "batch_size=8", "epochs=50", "eval_every_epochs=0",
        "early_stop_patience=null", "tensorboard=false", "optim.decay_epochs_1based=[2]", "log_every_steps=1", *extra])


# ---------------------------------------------------------------- configs
def test_presets_and_experiments_resolve():
    names = preset_names()
    assert {"fashioniq", "shoes", "cirr", "fashion200k", "synthetic"} <= set(names["presets"])
    cfg = load_config("fashioniq")
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.batch_size) == ("ViT-H-14", "laion2b_s32b_b79k", 16)
    assert (cfg.optim.backbone_lr, cfg.optim.new_lr, cfg.optim.decay_epochs_1based) == (1e-5, 1e-4, [5, 10])
    shoes = load_config("shoes")
    assert shoes.data.dataset == "shoes" and shoes.model.backbone == "ViT-H-14"  # inherited through base:
    for ablation in ("wo_fm", "wo_vfm", "wo_tfm", "wo_mgfp", "wo_target_vfm", "wo_target_mgfp", "wo_revision", "wo_bbc", "wo_fr"):
        for ds in ("fashioniq", "shoes", "cirr"):
            assert f"{ds}_{ablation}" in names["experiments"]
    exp = load_config("cirr_wo_revision")
    assert exp.model.use_revision is False and exp.model.ablations == ["wo_revision"] and exp.data.dataset == "cirr"


def test_overrides_are_typed_and_checked(tmp_path):
    cfg = load_config("synthetic", ["model.backbone=small", "batch_size=4", "optim.new_lr=3e-4",
                                    "optim.decay_epochs_1based=[2, 4]", "model.gate_split=per_token", "max_steps=null"])
    assert (cfg.model.backbone, cfg.batch_size, cfg.optim.new_lr) == ("small", 4, 3e-4)
    assert cfg.optim.decay_epochs_1based == [2, 4]
    assert cfg.model.gate_split == "per_token" and cfg.max_steps is None
    with pytest.raises(UserInputError, match=r"unknown config keys \['optim.lr'\]"):
        load_config("synthetic", ["optim.lr=1"])
    with pytest.raises(UserInputError, match='field batch_size is "eight" \\(str\\); expected an integer'):
        load_config("synthetic", ["batch_size=eight"])
    with pytest.raises(UserInputError, match="gate_split"):
        load_config("synthetic", ["model.gate_split=sideways"])
    with pytest.raises(UserInputError, match="key=value"):
        parse_overrides(["batch_size"])
    f = tmp_path / "mine.yaml"
    f.write_text("base: synthetic\nname: mine\nbatch_size: 12\n")
    mine = load_config(str(f), ["epochs=3"])
    assert (mine.name, mine.batch_size, mine.epochs, mine.model.backbone) == ("mine", 12, 3, "tiny")
    with pytest.raises(UserInputError, match="not a YAML file and not a preset"):
        load_config("no_such_preset")


def test_sampler_shards_cover_the_global_batch():
    single = EpochSampler(40, seed=1, global_batch=8)
    single.set_epoch(2)
    ranks = [EpochSampler(40, seed=1, global_batch=8, rank=r, world=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    order = [i for _, i in single]
    shards = [[i for _, i in s] for s in ranks]
    for step in range(5):  # global batch `step` = union of each rank's local batch `step`
        assert sorted(order[step * 8:(step + 1) * 8]) == sorted(shards[0][step * 4:(step + 1) * 4] + shards[1][step * 4:(step + 1) * 4])
    single.set_epoch(2, skip=16)
    assert [i for _, i in single] == order[16:]


# ----------------------------------------------------------------- resume
def _weights(run_dir):
    return load_file(str(Path(run_dir) / "last" / "model.safetensors"))


def test_resume_equals_uninterrupted(synth_root, tmp_path):
    # 4 steps per epoch; the interruption falls mid-epoch 0, the run crosses an lr decay at epoch 1.
    full = Trainer(_cfg(synth_root, tmp_path / "full", "max_steps=6"), progress=False).fit()
    assert full["steps"] == 6
    part = Trainer(_cfg(synth_root, tmp_path / "part", "max_steps=6"), progress=False, callbacks=[stop_after(3)]).fit()
    assert part["stopped"] == "interrupted" and part["steps"] == 3
    state = json.loads((tmp_path / "part" / "last" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 0, 3)
    # the saved state is the TrainState, every field of it
    assert TrainState.from_dict(state) == TrainState(step=3, epoch=0, batch_in_epoch=3, elapsed_s=state["elapsed_s"],
                                                     triplets=3 * 8, metrics_rows=3)
    assert {f for f in TrainState.__dataclass_fields__} <= set(state)
    resumed = Trainer(None, resume=tmp_path / "part", progress=False).fit()
    assert resumed["steps"] == 6
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the weights moved: the comparison is not between two untouched models
    assert not torch.equal(a["image_fc.weight"], _weights_untrained())
    lrs = [json.loads(line)["lr_new"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
           if '"lr_new"' in line]
    assert lrs[-1] == pytest.approx(1e-4)  # 1e-3 x 0.1 after epoch 1 began, restored on resume


def _rows(run_dir, timing=False):
    """metrics.jsonl's rows; without their clock fields (``timing=False``), which differ between two runs."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return rows if timing else [{k: v for k, v in r.items() if k not in ("triplets_per_s", "elapsed_s")} for r in rows]


def test_resume_after_a_kill_writes_each_step_once(synth_root, tmp_path):
    # 4 steps per epoch (checkpoints at 4 and 8), a checkpoint every 5 steps, an evaluation every 3: the process
    # dies during step 8, after the checkpoint of step 5 and the rows of step 6, its evaluation, and step 7
    extra = ("max_steps=10", "save_every_steps=5", "eval_every_steps=3")
    full = Trainer(_cfg(synth_root, tmp_path / "full", *extra), progress=False).fit()
    killed = tmp_path / "killed"
    with pytest.raises(SimulatedKill):
        Trainer(_cfg(synth_root, killed, *extra), progress=False, callbacks=[die_after(7)]).fit()
    assert json.loads((killed / "last" / "trainer_state.json").read_text())["step"] == 5
    assert [r["step"] for r in _rows(killed)][-3:] == [6, 6, 7]  # written after the checkpoint, done again on resume
    resumed = Trainer(None, resume=killed, progress=False).fit()
    assert (full["steps"], resumed["steps"]) == (10, 10)
    rows, expected = _rows(killed), _rows(tmp_path / "full")
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)) == list(range(1, 11))
    assert [r["step"] for r in rows if "eval" in r] == [3, 6, 9]
    assert rows == expected  # the same rows as the uninterrupted run, losses and evaluations bit for bit
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in full["history"]]


def test_summary_counts_the_whole_run_over_a_resume(synth_root, tmp_path):
    full = Trainer(_cfg(synth_root, tmp_path / "full", "max_steps=6"), progress=False).fit()
    part = Trainer(_cfg(synth_root, tmp_path / "part", "max_steps=6"), progress=False, callbacks=[stop_after(3)]).fit()
    assert part["triplets"] == 3 * 8
    resumed = Trainer(None, resume=tmp_path / "part", progress=False).fit()
    written = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert written == resumed
    # triplets and seconds both cover the whole run: both invocations, as the uninterrupted run's do
    assert resumed["triplets"] == full["triplets"] == 6 * 8
    assert resumed["seconds"] > resumed["train_seconds"] > part["train_seconds"] > 0
    assert resumed["seconds"] == pytest.approx(resumed["train_seconds"] + resumed["eval_seconds"])
    assert resumed["eval_seconds"] > part["eval_seconds"] == 0  # the one evaluation, at the end of the resumed part
    assert resumed["triplets_per_s"] == pytest.approx(resumed["triplets"] / resumed["train_seconds"])
    saved = json.loads((tmp_path / "part" / "last" / "trainer_state.json").read_text())
    assert (saved["triplets"], saved["elapsed_s"], saved["eval_s"]) == (
        resumed["triplets"], resumed["seconds"], resumed["eval_seconds"])


def test_the_summary_names_the_budget_that_ended_the_run(synth_root, tmp_path, caplog):
    # one step per epoch (32 triplets, batch 32); the synthetic preset's own epochs=20 ends the run before max_steps
    cfg = load_config("synthetic", [f"data.root={synth_root}", f"out_dir={tmp_path / 'epochs'}", "max_steps=40",
                                    "tensorboard=false", "eval_every_epochs=0", "batch_size=32"])
    assert (cfg.epochs, cfg.max_steps) == (20, 40)
    with caplog.at_level("INFO", logger="offset_cir.train.trainer"):
        summary = Trainer(cfg, progress=False).fit()
    assert (summary["steps"], summary["epochs"], summary["stopped"], summary["ended_by"]) == (20, 20, "epochs done",
                                                                                              "epochs")
    assert summary["reason"] == "epochs=20 done at step 20, end of epoch 20 (max_steps=40 not reached)"
    said = [r.getMessage() for r in caplog.records if r.name == "offset_cir.train.trainer"]
    assert any("max_steps=40 is out of reach: epochs=20 of 1 step(s) end the run at step 20" in m for m in said)
    assert said[-1].startswith(f"synthetic ended by epochs: {summary['reason']}")
    assert json.loads((tmp_path / "epochs" / "summary.json").read_text())["ended_by"] == "epochs"
    # max_steps on an epoch's last step ends that epoch too: evaluated once, counted as done, not trained again
    out = tmp_path / "steps"
    summary = Trainer(_cfg(synth_root, out, "max_steps=3", "batch_size=32", "eval_every_epochs=1"),
                      progress=False).fit()
    assert (summary["steps"], summary["epochs"], summary["ended_by"]) == (3, 3, "max_steps")
    assert summary["reason"] == "max_steps=3 reached at step 3, end of epoch 3 (epochs=50 not reached)"
    summary = Trainer(None, resume=out, overrides=["max_steps=5"], progress=False).fit()
    assert (summary["steps"], summary["epochs"], summary["ended_by"]) == (5, 5, "max_steps")
    assert [(r["step"], r["epoch"]) for r in _rows(out) if "eval" in r] == [(s, s) for s in range(1, 6)]
    assert [h["step"] for h in summary["history"]] == [1, 2, 3, 4, 5]
    # a resume of the finished run names the same budget
    again = Trainer(None, resume=out, progress=False).fit()
    assert (again["stopped"], again["ended_by"]) == ("already finished", "max_steps")


def _weights_untrained():
    from offset_cir import ModelConfig, build_model

    torch.manual_seed(42)
    return build_model(ModelConfig(backbone="tiny")).state_dict()["image_fc.weight"]


def test_resume_without_checkpoint_is_clear(tmp_path):
    with pytest.raises(UserInputError, match="no complete checkpoint"):
        Trainer(None, resume=tmp_path)


def test_nan_loss_stops_with_clear_message(synth_root, tmp_path):
    cfg = _cfg(synth_root, tmp_path / "nan", "max_steps=3", "model.logit_scale_init=.nan")
    with pytest.raises(TrainingError, match="non-finite loss at step 0"):
        Trainer(cfg, progress=False).fit()
    # through the CLI: a message and a non-zero exit, no traceback
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "offset_cir.cli", "train", "--config", "synthetic", "--no-progress",
                           f"data.root={synth_root}", f"out_dir={tmp_path / 'nan2'}", "batch_size=8", "max_steps=2",
                           "model.logit_scale_init=.nan", "tensorboard=false"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "non-finite loss" in proc.stderr and "Traceback" not in proc.stderr


# -------------------------------------------------------------------- DDP
def test_two_process_ddp_equals_single_process(synth_root, tmp_path):
    steps = 3
    single = _cfg(synth_root, tmp_path / "single", f"max_steps={steps}", "optim.decay_epochs_1based=[]")
    Trainer(single, progress=False).fit()
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={29500 + os.getpid() % 1000}",
           "-m", "offset_cir.cli", "train", "--config", "synthetic", "--no-progress",
           f"data.root={synth_root}", f"out_dir={tmp_path / 'ddp'}", "batch_size=4", "epochs=50",
           "eval_every_epochs=0", "early_stop_patience=null", "tensorboard=false", "optim.decay_epochs_1based=[]",
           f"max_steps={steps}", "log_every_steps=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    moved = max(float((a[k] - _initial()[k]).abs().max()) for k in ("image_fc.weight", "revision.mlp.0.weight"))
    assert moved > 1e-4
    # Elements whose true gradient is exactly zero (TFM's query/key rows, every attention's key bias) get an
    # exactly zero gradient: Adam leaves them alone, weight decay scales them identically in both runs.
    for k in [k for k in a if k.startswith(("tfm.qkv_text", "tfm.qkv_mask")) or k.endswith("attn.in_proj_bias")]:
        x, y = a[k], b[k]
        if k.startswith("tfm."):
            heads = 4
            x, y = (v[..., 0].view(heads, 3, -1, v.shape[1])[:, :2] for v in (x, y))
        else:
            c = x.shape[0] // 3
            x, y = x[c:2 * c], y[c:2 * c]
        assert torch.equal(x, y), (k, float((x - y).abs().max()))
    # Everything else differs by float32 rounding only. The two runs sum the same gradient terms in another order
    # (per-rank sums + all-reduce vs one sum over the batch): each gradient carries a relative error of at most about
    # n * eps32 for a reduction of n = batch x tokens terms, and Adam turns a relative error rho of its input into
    # about lr * rho in its step; each step also rounds the weight itself (eps32 * |w|). Adam normalises a gradient
    # element that cancels to ~0 into a step of any size up to its bound, so a few elements may leave that
    # tolerance (never more than the largest step Adam can take); a real difference (lost negatives, another loss)
    # moves most elements by about lr.
    lr, (beta1, beta2) = 1e-3, (0.9, 0.999)
    eps32 = torch.finfo(torch.float32).eps
    rho = 8 * (1 + 64) * eps32  # batch 8 x (1 + 8x8 patches) tokens of the tiny backbone
    # |m_hat / sqrt(v_hat)| <= sqrt(sum_s a_s^2 / b_s) for Adam's weights a_s (first moment) and b_s (second).
    adam_bound = sum(
        math.sqrt(sum(((1 - beta1) * beta1 ** (t - s) / (1 - beta1 ** t)) ** 2
                      / ((1 - beta2) * beta2 ** (t - s) / (1 - beta2 ** t)) for s in range(1, t + 1)))
        for t in range(1, steps + 1))
    over_total = 0
    for k in a:
        x, y = a[k].double(), b[k].double()
        diff = (x - y).abs()
        rounding = steps * (lr * rho + eps32 * torch.maximum(x.abs(), y.abs()))
        over = int((diff > rounding).sum())
        over_total += over
        assert float(diff.max()) <= 2 * lr * adam_bound, (k, float(diff.max()))
        assert over <= max(1, x.numel() // 100), (k, over, x.numel(), float(diff.max()))
    assert over_total <= 1e-4 * sum(v.numel() for v in a.values()), over_total
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    single_rows = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    # rank 0's loss spans the global batch through the feature gather: same first-step loss
    assert math.isclose(rows[0]["bbc"], single_rows[0]["bbc"], rel_tol=0.5)


_INIT = {}


def _initial():
    if not _INIT:
        from offset_cir import ModelConfig, build_model

        torch.manual_seed(42)
        _INIT.update(build_model(ModelConfig(backbone="tiny")).state_dict())
    return _INIT


def test_sigint_saves_and_resume_finishes(synth_root, tmp_path):
    import signal
    import time

    out = tmp_path / "sig"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "offset_cir.cli", "train", "--config", "synthetic", "--no-progress",
                             f"data.root={synth_root}", f"out_dir={out}", "batch_size=8", "max_steps=400",
                             "eval_every_epochs=0", "tensorboard=false", "log_every_steps=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(600):  # bounded wait (at most 120 s) for the first logged step
            if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip():
                break
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err
    state = json.loads((out / "last" / "trainer_state.json").read_text())
    assert 1 <= state["step"] < 400
    assert not (out / "last.tmp").exists()
    cfg_steps = 2 + state["step"]
    # resume (with the saved config) and run a little further
    saved = TrainConfig.from_dict(state["config"])
    assert saved.max_steps == 400 and saved.out_dir == str(out)
    trainer = Trainer(None, resume=out, progress=False)
    trainer.cfg.max_steps = cfg_steps
    summary = trainer.fit()
    assert summary["steps"] == cfg_steps


def _steps_written(run_dir) -> list[int]:
    """The steps of metrics.jsonl's whole lines (a line a killed process tore is left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []
    return [json.loads(line)["step"] for line in lines]


@pytest.mark.slow  # a training process of its own, killed and resumed: 30 s or more on a loaded 2-core machine
def test_sigkill_then_resume_writes_each_step_once(synth_root, tmp_path):
    import signal
    import time

    out = tmp_path / "killed"
    args = _cli_args(synth_root, out, "max_steps=400", "save_every_steps=3")
    proc = subprocess.Popen([sys.executable, "-m", "offset_cir.cli", "train", "--no-progress", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    checkpoint, written = None, []
    try:
        for _ in range(1500):  # bounded wait (at most about 300 s) for rows written after a checkpoint
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGSTOP)  # frozen: its files hold still while they are read
            state = out / "last" / "trainer_state.json"
            checkpoint = json.loads(state.read_text())["step"] if state.is_file() else None
            written = _steps_written(out)
            if checkpoint and written and written[-1] > checkpoint + 1:
                proc.kill()  # SIGKILL: no handler runs, nothing is saved
                break
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert written[-1] > checkpoint + 1  # rows of steps after the checkpoint: the resumed run trains them again
    end = written[-1] + 2
    assert _cli("--resume", out, f"max_steps={end}") == 0
    assert _cli(*_cli_args(synth_root, tmp_path / "full", f"max_steps={end}", "save_every_steps=3")) == 0
    assert _steps_written(out) == _steps_written(tmp_path / "full") == [*range(1, end + 1), end]  # last: its evaluation
    losses = [r["loss"] for r in _rows(out) if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in _rows(tmp_path / "full") if "loss" in r], rel=1e-5)


# ------------------------------------------------- no run lost
def _snapshot(folder):
    """Every file under ``folder`` with its bytes and modification time: equal snapshots = untouched folder."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(*argv):
    from offset_cir.cli import main

    return main(["train", "--no-progress", *[str(a) for a in argv]])


def _cli_args(root, out, *extra):
    return ["--config", "synthetic", f"data.root={root}", f"out_dir={out}", "batch_size=8", "eval_every_epochs=0",
            "early_stop_patience=null", "tensorboard=false", "log_every_steps=1", *extra]


def test_new_run_into_a_non_empty_out_dir_is_refused_unless_overwrite(synth_root, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    first = Trainer(_cfg(synth_root, out, "max_steps=2"), progress=False).fit()
    assert (out / "best").is_dir() and (out / "last").is_dir()
    before = _snapshot(out)
    assert _cli(*_cli_args(synth_root, out, "max_steps=3")) == 2
    err = capsys.readouterr().err
    assert str(out) in err and f"--resume {out}" in err and "out_dir=" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert _snapshot(out) == before  # nothing replaced, nothing appended
    with pytest.raises(UserInputError, match="not empty"):
        Trainer(_cfg(synth_root, out, "max_steps=3"), progress=False).fit()
    assert _snapshot(out) == before
    # --overwrite (overwrite=True) is the way to reuse it: the new run replaces the old one, no mixed metrics
    (out / "notes.txt").write_text("mine")  # not a run file: left alone
    (out / ".best_result.json.tmp4242").write_text("{")  # a temporary a killed run left behind: the run's own
    with caplog.at_level("INFO", logger="offset_cir.train.trainer"):
        second = Trainer(_cfg(synth_root, out, "max_steps=3"), progress=False, overwrite=True).fit()
    assert (first["steps"], second["steps"]) == (2, 3)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert json.loads((out / "best" / "config.json").read_text())["step"] == 3
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / ".best_result.json.tmp4242").exists()
    # throughput: summary.json and the last log line of the run give triplets/s
    summary = json.loads((out / "summary.json").read_text())
    assert summary["triplets"] == 3 * 8  # 3 steps of one batch of 8
    assert summary["triplets_per_s"] == pytest.approx(summary["triplets"] / summary["train_seconds"])
    last = [r.getMessage() for r in caplog.records if r.name == "offset_cir.train.trainer"][-1]
    assert f"{summary['triplets_per_s']:.1f} triplets/s" in last


def test_missing_data_root_says_how_to_make_it_and_leaves_no_run_folder(tmp_path, capsys):
    from offset_cir.errors import DatasetError

    missing, out = tmp_path / "no_data", tmp_path / "run"
    with pytest.raises(DatasetError, match=f"offset synth --out {missing}"):
        Trainer(_cfg(missing, out, "max_steps=2"), progress=False).fit()
    assert not out.exists()
    assert _cli(*_cli_args(missing, out, "max_steps=2")) == 2
    assert f"offset synth --out {missing}" in capsys.readouterr().err
    assert not out.exists()


def test_resume_of_a_finished_run_trains_nothing_unless_its_budget_is_raised(synth_root, tmp_path, capsys):
    out = tmp_path / "done"
    Trainer(_cfg(synth_root, out, "epochs=1"), progress=False).fit()  # 4 steps, all epochs done
    before = _snapshot(out)
    summary = Trainer(None, resume=out, progress=False).fit()
    assert summary["stopped"] == "already finished" and summary["steps"] == 4 and "epochs=1" in summary["reason"]
    assert _snapshot(out) == before
    assert _cli("--resume", out) == 0  # through the CLI too: said, nothing trained
    assert '"already finished"' in capsys.readouterr().out
    assert _snapshot(out) == before
    # only the budget may change on resume: the rest keeps the data order of the saved run
    with pytest.raises(UserInputError, match="batch_size cannot change on resume"):
        Trainer(None, resume=out, overrides=["batch_size=4"])
    assert _cli("--resume", out, "epochs=2", "max_steps=5") == 0  # a raised budget continues
    state = json.loads((out / "last" / "trainer_state.json").read_text())
    assert (state["step"], state["config"]["max_steps"], state["config"]["epochs"]) == (5, 5, 2)
    assert Trainer(None, resume=out, progress=False).fit()["stopped"] == "already finished"


@pytest.fixture
def sigint_ignored():
    """SIGINT ignored, as a shell sets it for a background job (Python then installs no KeyboardInterrupt
    handler): only a handler of the trainer's own can honour it."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_during_resume_set_up_is_honoured(synth_root, tmp_path, monkeypatch, sigint_ignored):
    import signal

    import offset_cir.data

    out = tmp_path / "sig"
    part = Trainer(_cfg(synth_root, out, "max_steps=3"), progress=False, callbacks=[stop_after(1)]).fit()
    assert part["stopped"] == "interrupted" and part["steps"] == 1
    before = _snapshot(out / "last")
    real = offset_cir.data.get_dataset

    def slow_set_up(*args, **kwargs):  # the signal arrives while the resumed run is being set up
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(offset_cir.data, "get_dataset", slow_set_up)
    summary = Trainer(None, resume=out, progress=False).fit()
    assert summary["stopped"] == "interrupted" and summary["steps"] == 1
    assert _snapshot(out / "last") == before  # nothing trained: the checkpoint is the one it resumed from
    monkeypatch.setattr(offset_cir.data, "get_dataset", real)
    assert Trainer(None, resume=out, progress=False).fit()["steps"] == 3


def test_sigint_before_the_trainer_exists_is_honoured_by_the_cli(synth_root, tmp_path, monkeypatch, sigint_ignored):
    import signal

    import offset_cir.train.config as config

    real = config.load_config

    def load_config_then_signal(*args, **kwargs):  # the signal arrives during the CLI's own set-up
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(config, "load_config", load_config_then_signal)
    out = tmp_path / "early"
    assert _cli(*_cli_args(synth_root, out, "max_steps=50")) == 130
    assert not out.exists()  # stopped before the run began: nothing to resume, nothing in the way of a rerun


def test_training_draws_its_curves_and_evaluates_with_a_progress_bar(synth_root, tmp_path, monkeypatch):
    from PIL import Image

    import offset_cir.eval.evaluate as evaluate_module
    import offset_cir.train.run_log as run_log_module

    seen_progress, drawn = [], []
    real_evaluate, real_plot = evaluate_module.evaluate, run_log_module.plot_curves

    def evaluate(*args, **kwargs):
        seen_progress.append(kwargs.get("progress", True))
        return real_evaluate(*args, **kwargs)

    def plot_curves(metrics_path, png, **kwargs):  # record how many evaluations each drawing saw
        drawn.append(sum('"eval"' in line for line in Path(metrics_path).read_text().splitlines()))
        return real_plot(metrics_path, png, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
    monkeypatch.setattr(run_log_module, "plot_curves", plot_curves)
    out = tmp_path / "curves"
    Trainer(_cfg(synth_root, out, "max_steps=8", "eval_every_epochs=1"), progress=True).fit()
    assert seen_progress == [True, True]  # one evaluation per epoch, each with its bar
    assert drawn[:2] == [1, 2]  # drawn after each evaluation, as the run goes
    with Image.open(out / "curves.png") as im:
        im.verify()
        assert im.format == "PNG"
    assert not list(out.glob("*.tmp*"))
    seen_progress.clear()
    Trainer(_cfg(synth_root, tmp_path / "quiet", "max_steps=4", "eval_every_epochs=1"), progress=False).fit()
    assert seen_progress == [False]


def test_curves_png_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from offset_cir.train.trainer import plot_curves

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 2.0, "bbc": 1.8, "fr": 0.2},
        {"step": 2, "eval": {"R@1": 10.0, "R@5": 40.0}, "selection": 50.0}]) + "\n")
    png = tmp_path / "curves.png"
    plot_curves(metrics, png)
    good = png.read_bytes()
    assert good.startswith(b"\x89PNG")

    def crash_half_way(self, fname, **kwargs):
        Path(fname).write_bytes(good[: len(good) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        plot_curves(metrics, png)
    assert png.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]


_DDP_WORKER = r'''
import json, sys
import torch
from safetensors.torch import save_file
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from offset_cir.train.config import load_config
from offset_cir.train.trainer import Trainer

report, overrides = sys.argv[1], json.loads(sys.argv[2])
synced = []
ddp_init = torch.nn.parallel.DistributedDataParallel.__init__


def init(self, *args, **kwargs):
    ddp_init(self, *args, **kwargs)

    def counting_allreduce(state, bucket):
        if bucket.index() == 0:  # DDP calls the hook once per bucket of each synchronised backward pass
            synced.append(1)
        return allreduce_hook(state, bucket)

    self.register_comm_hook(None, counting_allreduce)


torch.nn.parallel.DistributedDataParallel.__init__ = init
first_grads = {}
adam_step = torch.optim.AdamW.step


def step(self, *args, **kwargs):
    if not first_grads:
        params = [p for g in self.param_groups for p in g["params"]]
        first_grads.update({f"p{i}": p.grad.detach().clone() for i, p in enumerate(params) if p.grad is not None})
    return adam_step(self, *args, **kwargs)


torch.optim.AdamW.step = step
summary = Trainer(load_config("synthetic", overrides), progress=False).fit()
rank = torch.distributed.get_rank()
json.dump({"synced": len(synced), "steps": summary["steps"]}, open(f"{report}.{rank}.json", "w"))
if rank == 0:
    save_file(first_grads, f"{report}.grads.safetensors")
'''


@pytest.mark.slow  # two processes of their own: about a minute on a loaded 2-core machine
def test_ddp_gradient_accumulation_all_reduces_once_per_step(synth_root, tmp_path, monkeypatch):
    """grad_accum=2 under two gloo processes: one all-reduce per optimizer step (no_sync on the other micro-batch),
    and the first step's gradient equals the single-process accumulated one."""
    import socket

    steps, accum = 2, 2
    common = ["epochs=50", "eval_every_epochs=0", "early_stop_patience=null", "tensorboard=false",
              "optim.decay_epochs_1based=[]", f"max_steps={steps}", f"optim.grad_accum={accum}",
              f"data.root={synth_root}"]
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = tmp_path / "report"
    overrides = json.dumps(common + ["batch_size=4", f"out_dir={tmp_path / 'ddp'}"])
    procs = []
    try:
        for rank in range(2):
            env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),  # the tree under test, not an install:
                       PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
            procs.append(subprocess.Popen([sys.executable, str(script), str(report), overrides], cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for e in errs)
    for rank in range(2):
        counts = json.loads(Path(f"{report}.{rank}.json").read_text())
        assert counts == {"synced": steps, "steps": steps}, counts  # not steps x grad_accum

    # the same two steps in one process: batch 8 = both ranks' 4, the same micro-batches (EpochSampler)
    first_grads = {}
    adam_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        if not first_grads:
            params = [p for g in self.param_groups for p in g["params"]]
            first_grads.update({f"p{i}": p.grad.detach().clone() for i, p in enumerate(params) if p.grad is not None})
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    Trainer(load_config("synthetic", common + ["batch_size=8", f"out_dir={tmp_path / 'single'}"]), progress=False).fit()
    ddp = load_file(f"{report}.grads.safetensors")
    assert ddp.keys() == first_grads.keys()
    # The same terms summed in another order (per-rank sums, then the all-reduce's average, vs one sum over the
    # batch): float32 rounding only, at most about n * eps32 relative to the gradient's scale for reductions of
    # n = 8 triplets x (1 + 8x8) tokens terms of the tiny backbone, twice (two micro-batches). A lost or
    # unaveraged micro-batch changes gradients by a good fraction of their scale.
    scale = max(float(g.abs().max()) for g in first_grads.values())
    n_terms = 8 * (1 + 64)
    worst = max(float((ddp[k] - first_grads[k]).abs().max()) for k in ddp)
    assert worst <= 2 * n_terms * torch.finfo(torch.float32).eps * scale, (worst, scale)


# --------------------------------------------- configs: the release base and machine settings
def test_dataset_presets_build_on_the_release_recipe():
    # the dataset presets rest on the release's recipe, not on FashionIQ
    import yaml

    from importlib import resources

    configs = resources.files("offset_cir") / "configs"
    for name in ("fashioniq", "cirr", "shoes", "fashion200k"):
        assert yaml.safe_load((configs / f"{name}.yaml").read_text())["base"] == "release", name
    names = preset_names()
    assert "release" not in names["presets"]  # a base, not a run of its own
    assert {"default", "server", "cpu"} <= set(names["machines"])


def test_release_yaml_is_the_release_recipe():
    # docs/model.md#training, read by hand: "AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.01), lr 1e-5 for backbone
    # parameters and 1e-4 for new modules (including s), x0.1 at the start of epochs 5 and 10, batch 16, fp16
    # autocast with a grad scaler, up to 100 epochs, evaluation every epoch, early stop after 5 epochs without
    # improvement ... Seed 42"; section 8: the results are ViT-H-14's. The release's train.py counts the 5 epochs
    # of its tolerance from the best one: four evaluations without improvement, then an unevaluated epoch.
    import yaml

    from importlib import resources

    release = yaml.safe_load((resources.files("offset_cir") / "configs" / "release.yaml").read_text())
    optim = release["optim"]
    assert [float(b) for b in optim["betas"]] == [0.9, 0.999] and float(optim["eps"]) == 1e-8
    assert float(optim["weight_decay"]) == 0.01
    assert (float(optim["backbone_lr"]), float(optim["new_lr"])) == (1e-5, 1e-4)
    assert (optim["decay_epochs_1based"], float(optim["decay_factor"])) == ([5, 10], 0.1)
    assert (release["batch_size"], release["epochs"], release["eval_every_epochs"]) == (16, 100, 1)
    assert (release["early_stop_patience"], release["seed"]) == (4, 42)
    assert release["model"]["backbone"] == "ViT-H-14"
    # no dataset, no machine setting: those live apart (the release's data setting is how its masks load)
    assert release["data"] == {"clipseg_maps": "release"} and "device" not in release
    cfg = load_config("cirr")
    with pytest.raises(UserInputError, match="fp16 needs a CUDA device"):
        training_precision(load_config("cirr", ["precision=fp16"]).precision, torch.device("cpu"))
    assert cfg.precision == "auto" and training_precision(cfg.precision, torch.device("cuda", 0)) == "fp16"


def test_machine_settings_come_apart_from_the_experiment(tmp_path):
    default, server = load_config("synthetic"), load_config("cirr")
    assert (default.device, default.data.num_workers, default.data.root) == ("auto", 0, "data/synthetic")
    assert (server.device, server.data.num_workers, server.data.root) == ("auto", 4, "data/cirr")
    # machine=NAME picks another machine and changes nothing but the machine settings
    cpu = load_config("cirr", ["machine=cpu"])
    assert (cpu.device, cpu.data.num_workers) == ("cpu", 0)
    differs = {k for k, v in cpu.to_dict().items() if v != server.to_dict()[k]}
    assert differs == {"device", "data"}
    assert {k for k, v in cpu.data.__dict__.items() if v != server.data.__dict__[k]} == {"num_workers"}
    # a machine file of one's own: its data roots fill data.root; a config's own data.root and workers win
    mine = tmp_path / "cluster.yaml"
    mine.write_text("base: server\ndevice: cuda:1\ndata_roots:\n  cirr: /datasets/CIRR\n")
    on_cluster = load_config("cirr", [f"machine={mine}"])
    assert (on_cluster.device, on_cluster.data.num_workers, on_cluster.data.root) == ("cuda:1", 4, "/datasets/CIRR")
    own = tmp_path / "own.yaml"
    own.write_text(f"base: cirr\nmachine: {mine}\ndata:\n  root: /elsewhere\n  num_workers: 1\n")
    assert (load_config(str(own)).data.root, load_config(str(own)).data.num_workers) == ("/elsewhere", 1)
    # a machine file holds machine settings only, and a wrong name is named with the choices
    (tmp_path / "bad.yaml").write_text("device: cpu\nbatch_size: 64\ndata:\n  protocol: cirr\n")
    with pytest.raises(UserInputError, match=r"bad.yaml: \['batch_size', 'data.protocol'\] are not machine settings"):
        load_config("cirr", [f"machine={tmp_path / 'bad.yaml'}"])
    with pytest.raises(UserInputError, match=r"machine 'laptop': not a YAML file.*'cpu', 'default', 'server'"):
        load_config("cirr", ["machine=laptop"])


def test_print_config_yaml_reads_back_as_the_same_config(capsys):
    import yaml

    from offset_cir.cli import main
    from offset_cir.train.config import to_yaml

    cfg = load_config("cirr_wo_fm", ["machine=cpu", "optim.betas=[0.8, 0.99]"])
    assert TrainConfig.from_dict(yaml.safe_load(to_yaml(cfg.to_dict()))) == cfg
    assert main(["train", "--config", "cirr_wo_fm", "--print-config", "machine=cpu", "optim.betas=[0.8, 0.99]"]) == 0
    assert TrainConfig.from_dict(yaml.safe_load(capsys.readouterr().out)) == cfg


def test_selection_rule_is_a_field_of_the_protocol(synth_root):
    import dataclasses

    import offset_cir.eval.evaluate as ev
    from offset_cir import ModelConfig, build_model
    from offset_cir.data import get_dataset
    from offset_cir.eval.protocols import PROTOCOLS

    # docs/model.md#training: FashionIQ the categories' R@10, Shoes R@10 + R@50, CIRR all seven validation metrics
    assert all(PROTOCOLS[n].selection_ks == (10,) for n in ("fashioniq", "fashioniq-union", "fashioniq-full"))
    assert PROTOCOLS["shoes"].selection_ks == (10, 50) and PROTOCOLS["cirr-val"].selection_ks is None
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="tiny"))
    bench = get_dataset("synthetic", synth_root)
    kw = dict(split="val", batch_size=8, num_workers=0, progress=False)
    full = ev.evaluate(model, bench, "cirr-val", **kw)
    m = full["metrics"]
    assert full["selection_score"] == pytest.approx(sum(m[k] for k in ("R@1", "R@5", "R@10", "R@50", "R_subset@1",
                                                                        "R_subset@2", "R_subset@3")))
    assert full["selection_rule"] == "sum of R@1/5/10/50 and R_subset@1/2/3"
    original = PROTOCOLS["cirr-val"]
    try:
        PROTOCOLS["cirr-val"] = dataclasses.replace(original, selection_ks=(1, 50))
        changed = ev.evaluate(model, bench, "cirr-val", **kw)
    finally:
        PROTOCOLS["cirr-val"] = original
    assert changed["metrics"] == m
    assert changed["selection_score"] == pytest.approx(m["R@1"] + m["R@50"] + m["R_subset@1"] + m["R_subset@2"]
                                                       + m["R_subset@3"])


# ------------------------------------------------------------------- device and optional dependencies
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_named_before_anything_is_written(synth_root, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserInputError, match="device 'cuda': CUDA is not available"):
        Trainer(_cfg(synth_root, out, "max_steps=1", "device=cuda"), progress=False).fit()
    assert not out.exists()


def test_a_missing_tensorboard_is_named_before_anything_is_written(synth_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: `import` raises ImportError
    out = tmp_path / "run"
    with pytest.raises(UserInputError, match=r"needs tensorboard, which is not installed: "
                                             r"pip install 'offset-cir\[train\]'"):
        Trainer(_cfg(synth_root, out, "max_steps=1", "tensorboard=true"), progress=False).fit()
    assert not out.exists()


def test_a_missing_matplotlib_costs_the_curves_only(synth_root, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        Trainer(_cfg(synth_root, out, "max_steps=2", "eval_every_steps=1"), progress=False).fit()
    assert (out / "last").is_dir() and not (out / "curves.png").exists()
    assert any("needs matplotlib, which is not installed" in r.getMessage() for r in caplog.records)


def test_tensorboard_and_matplotlib_are_in_the_train_extra_only():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split("=")[0].split("[")[0].strip().lower() for r in reqs}  # noqa: E731
    assert not {"tensorboard", "matplotlib"} & names(project["dependencies"])
    assert {"tensorboard", "matplotlib"} <= names(project["optional-dependencies"]["train"])
    # `make test` and `make demo` install it (curves.png, the demo's figures)
    install = [line for line in (ROOT / "Makefile").read_text().splitlines() if "pip install" in line and "-e" in line]
    assert install and all("train" in line.split("[", 1)[1].split("]", 1)[0].split(",") for line in install)


def test_model_data_and_eval_import_neither_tensorboard_nor_matplotlib():
    code = (
        "import importlib, pkgutil, sys\n"
        "for name in ('offset_cir.model', 'offset_cir.data', 'offset_cir.eval'):\n"
        "    package = importlib.import_module(name)\n"
        "    for info in pkgutil.walk_packages(package.__path__, name + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'matplotlib')))\n"
        "print(len([m for m in sys.modules if m.startswith(('offset_cir.model.', 'offset_cir.eval.'))]))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded, modules = proc.stdout.splitlines()
    assert loaded == "[]"
    assert int(modules) >= 8  # the walk did import the packages' modules


def test_the_release_base_is_not_a_config_of_its_own():
    with pytest.raises(UserInputError, match=r"--config release: .*base of the presets.*presets: .*fashioniq"):
        load_config("release")
    assert load_config("cirr").optim.new_lr == 1e-4  # the presets still rest on it
