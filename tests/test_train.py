"""Trainer: config presets and overrides, resume equals uninterrupted, NaN stop, DDP equivalence (gloo)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offset_cir.errors import TrainingError, UserInputError
from offset_cir.train.config import load_config, parse_overrides, preset_names
from offset_cir.train.trainer import EpochSampler, Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from offset_cir.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root / "bench", seed=3, image_size=64, n_train=32, n_val=8, n_test=8)
    return root / "bench"


def _cfg(root, out, *extra):
    return load_config("synthetic", [
        f"data.root={root}", f"out_dir={out}", "batch_size=8", "epochs=50", "eval_every_epochs=0",
        "early_stop_patience=null", "tensorboard=false", "optim.decay_epochs=[1]", "log_every_steps=1", *extra])


# ---------------------------------------------------------------- configs
def test_presets_and_experiments_resolve():
    names = preset_names()
    assert {"fashioniq", "shoes", "cirr", "fashion200k", "synthetic"} <= set(names["presets"])
    cfg = load_config("fashioniq")
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.batch_size) == ("ViT-H-14", "laion2b_s32b_b79k", 16)
    assert (cfg.optim.backbone_lr, cfg.optim.new_lr, cfg.optim.decay_epochs) == (1e-5, 1e-4, [5, 10])
    shoes = load_config("shoes")
    assert shoes.data.dataset == "shoes" and shoes.model.backbone == "ViT-H-14"  # inherited through base:
    for ablation in ("wo_fm", "wo_vfm", "wo_tfm", "wo_mgfp", "wo_target_vfm", "wo_target_mgfp", "wo_revision", "wo_bbc", "wo_fr"):
        for ds in ("fashioniq", "shoes", "cirr"):
            assert f"{ds}_{ablation}" in names["experiments"]
    exp = load_config("cirr_wo_revision")
    assert exp.model.revision is False and exp.model.ablations == ["wo_revision"] and exp.data.dataset == "cirr"


def test_overrides_are_typed_and_checked(tmp_path):
    cfg = load_config("synthetic", ["model.backbone=small", "batch_size=4", "optim.new_lr=3e-4",
                                    "optim.decay_epochs=[2, 4]", "model.gate_split=per_token", "max_steps=null"])
    assert (cfg.model.backbone, cfg.batch_size, cfg.optim.new_lr, cfg.optim.decay_epochs) == ("small", 4, 3e-4, [2, 4])
    assert cfg.model.gate_split == "per_token" and cfg.max_steps is None
    with pytest.raises(UserInputError, match=r"unknown config keys \['optim.lr'\]"):
        load_config("synthetic", ["optim.lr=1"])
    with pytest.raises(UserInputError, match="batch_size: expected an integer"):
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
    part = Trainer(_cfg(synth_root, tmp_path / "part", "max_steps=6"), progress=False, stop_after_steps=3).fit()
    assert part["stopped"] == "interrupted" and part["steps"] == 3
    state = json.loads((tmp_path / "part" / "last" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 0, 3)
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
    single = _cfg(synth_root, tmp_path / "single", f"max_steps={steps}", "optim.decay_epochs=[]")
    Trainer(single, progress=False).fit()
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={29500 + os.getpid() % 1000}",
           "-m", "offset_cir.cli", "train", "--config", "synthetic", "--no-progress",
           f"data.root={synth_root}", f"out_dir={tmp_path / 'ddp'}", "batch_size=4", "epochs=50",
           "eval_every_epochs=0", "early_stop_patience=null", "tensorboard=false", "optim.decay_epochs=[]",
           f"max_steps={steps}", "log_every_steps=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    moved = max(float((a[k] - _initial()[k]).abs().max()) for k in ("image_fc.weight", "revision.mlp.0.weight"))
    assert moved > 1e-4
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.in_proj_bias"):
            # The key bias's true gradient is zero (softmax ignores a constant per query), so Adam turns
            # float rounding into +-lr steps in either run: compare the query and value parts only.
            c = x.shape[0] // 3
            x, y = torch.cat([x[:c], x[2 * c:]]), torch.cat([y[:c], y[2 * c:]])
        # Adam normalises each step to about lr = 1e-3 whatever the gradient's size, so near-zero gradients turn
        # rounding differences into visible ones: bound the worst element at 3% of the largest possible
        # 3-step update, and the average far below it. A real difference (lost negatives, wrong scaling)
        # moves most elements by about the update size.
        diff = (x - y).abs()
        assert float(diff.max()) < 1e-4 and float(diff.mean()) < 1e-6, (k, float(diff.max()), float(diff.mean()))
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
    from offset_cir.train.config import config_from_dict

    saved = config_from_dict(state["config"])
    assert saved.max_steps == 400 and saved.out_dir == str(out)
    trainer = Trainer(None, resume=out, progress=False)
    trainer.cfg.max_steps = cfg_steps
    summary = trainer.fit()
    assert summary["steps"] == cfg_steps
