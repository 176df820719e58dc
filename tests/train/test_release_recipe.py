"""The release presets train as the authors' release does (its train.py and datasets.py at commit 408bece, read by
hand): the learning-rate schedule, early stopping and selection, the last partial batch, the losses under
autocast, the release's CLIPSeg maps; a training run of the ``cirr`` preset on placeholder data logs the schedule."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import random

import pytest
import torch

from offset_cir.data import get_dataset
from offset_cir.errors import DatasetError
from offset_cir.testing.placeholders import write_benchmark_placeholders, write_release_maps
from offset_cir.testing.training import ScriptedEvaluation
from offset_cir.train.config import load_config
from offset_cir.train.trainer import Trainer

# Both learning rates of the release for epochs 1-12 (counted from 1), by hand from its train.py: lr 1e-5 (CLIP) and
# 1e-4 (the rest), multiplied by lr_div=0.1 before its 0-based epoch e when e != 0, (e + 1) % lr_decay == 0 with
# lr_decay=5, and e < max_decay_epoch=10: before 0-based epochs 4 and 9.
RELEASE_SCHEDULE = {
    1: (1e-5, 1e-4), 2: (1e-5, 1e-4), 3: (1e-5, 1e-4), 4: (1e-5, 1e-4),
    5: (1e-6, 1e-5), 6: (1e-6, 1e-5), 7: (1e-6, 1e-5), 8: (1e-6, 1e-5), 9: (1e-6, 1e-5),
    10: (1e-7, 1e-6), 11: (1e-7, 1e-6), 12: (1e-7, 1e-6),
}


def _cirr_copy(root, n_train: int, n_val: int = 4, release_maps: bool = False):
    """A CIRR-layout copy: ``n_train`` train and ``n_val`` val triplets over sets of images; placeholder images with
    masks of their size, or 48x24 images with the release's 352x352 maps."""
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    for split, n, folder in (("train", n_train, "train/0"), ("val", n_val, "dev")):
        names = {f"{split}-{i}-img0": f"./{folder}/{split}-{i}-img0.png" for i in range(n + 1)}
        recs = [{"pairid": i, "reference": f"{split}-{i}-img0", "target_hard": f"{split}-{i + 1}-img0",
                 "target_soft": {}, "caption": f"make it {i}",
                 "img_set": {"id": i, "members": list(names)[:6], "reference_rank": 0, "target_rank": 1}}
                for i in range(n)]
        (root / f"captions/cap.rc2.{split}.json").write_text(json.dumps(recs))
        (root / f"image_splits/split.rc2.{split}.json").write_text(json.dumps(names))
    bench = get_dataset("cirr", root)
    for split in ("train", "val"):
        if release_maps:
            write_release_maps(bench, split)
        else:
            write_benchmark_placeholders(bench, split)
    return root


def _cirr_preset(root, out, *extra):
    """The ``cirr`` preset as it stands, on the tiny backbone and the CPU, with the data and budget given."""
    return load_config("cirr", [f"data.root={root}", f"out_dir={out}", "model.backbone=tiny", "model.pretrained=null",
                                "machine=cpu", "tensorboard=false", "batch_size=2", "log_every_steps=1", *extra])


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def cirr_run(tmp_path_factory):
    """The cirr preset for 12 epochs of 5 triplets (batch 2: two whole batches and one of 1), no evaluation: its
    summary, metrics.jsonl rows, log lines and progress-bar text."""
    tmp = tmp_path_factory.mktemp("cirr_run")
    root = _cirr_copy(tmp / "cirr", n_train=5)
    cfg = _cirr_preset(root, tmp / "run", "epochs=12", "eval_every_epochs=0")
    handler, bars = _Lines(), io.StringIO()
    logger = logging.getLogger("offset_cir.train")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stderr(bars):
            summary = Trainer(cfg, progress=True).fit()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "rows": rows, "log": handler.lines, "bars": bars.getvalue()}


def test_cirr_preset_decays_the_learning_rates_where_the_release_does(cirr_run):
    by_epoch: dict[int, set] = {}
    for row in cirr_run["rows"]:
        by_epoch.setdefault(row["epoch"], set()).add((row["lr_backbone"], row["lr_new"]))
    assert sorted(by_epoch) == list(range(1, 13))  # metrics.jsonl counts epochs from 1
    for epoch, (backbone, new) in RELEASE_SCHEDULE.items():
        ((got_backbone, got_new),) = by_epoch[epoch]
        assert (got_backbone, got_new) == (pytest.approx(backbone, rel=1e-9), pytest.approx(new, rel=1e-9)), epoch
    # the log says the schedule epoch by epoch, counted as metrics.jsonl and the progress bar count
    schedule = [line for line in cirr_run["log"] if line.startswith("epoch ")]
    assert schedule == [f"epoch {e}/12: lr backbone {b:.3g}, new modules {n:.3g}" for e, (b, n) in
                        RELEASE_SCHEDULE.items()]
    print("\n".join(schedule))
    assert "cirr epoch 1/12" in cirr_run["bars"] and "cirr epoch 12/12" in cirr_run["bars"]
    assert "epoch 0" not in cirr_run["bars"] and "epoch 13" not in cirr_run["bars"]


def test_cirr_preset_keeps_the_last_partial_batch(cirr_run):
    summary = cirr_run["summary"]
    assert summary["epochs"] == 12 and summary["steps"] == 12 * 3  # batches of 2, 2 and 1
    assert summary["triplets"] == 12 * 5  # every triplet of every epoch, as the release's DataLoader
    assert {row["step"] % 3 for row in cirr_run["rows"]} == {0, 1, 2}


def release_selection(scores, tolerance_epoch: int = 5) -> tuple[int | None, int]:
    """(the epoch, counted from 1, the release's train.py keeps as its best; how many epochs it evaluates), for
    validation scores in epoch order. Its loop adds 1 to a counter at the start of every epoch, trains, evaluates
    only while the counter is below tolerance_epoch (else it stops, that epoch trained but never evaluated), and on
    a strictly higher score keeps that epoch and sets the counter back to 0."""
    best, best_epoch, tolerance, evaluated = float("-inf"), None, 0, 0
    for epoch, score in enumerate(scores, start=1):
        tolerance += 1
        if tolerance >= tolerance_epoch:
            break
        evaluated += 1
        if score > best:
            best, best_epoch, tolerance = score, epoch, 0
    return best_epoch, evaluated


_rng = random.Random(19)
SEQUENCES = [
    [1, 2, 3, 3, 2, 1, 0, 5, 6],  # a tie, then four evaluations without improvement: the 8th epoch's 5 never counts
    [5, 5, 5, 5, 5, 5],  # ties only: the first epoch stays the best
    [0.5, 1, 0.9, 0.8, 0.7, 2, 1, 1, 3, 0, 0, 0, 0, 9],  # improvements within the patience
    *[[_rng.choice([0, 1, 2, 3]) for _ in range(12)] for _ in range(2)],  # scripted at random, ties frequent
]


@pytest.mark.parametrize("scores", SEQUENCES)
def test_cirr_preset_selects_the_epoch_the_release_selects(tmp_path, monkeypatch, scores):
    import offset_cir.eval.evaluate as evaluate_module

    scripted = ScriptedEvaluation(scores)
    monkeypatch.setattr(evaluate_module, "evaluate", scripted)
    root = _cirr_copy(tmp_path / "cirr", n_train=2)
    summary = Trainer(_cirr_preset(root, tmp_path / "run", f"epochs={len(scores)}"), progress=False).fit()
    best_epoch, evaluated = release_selection(scores)
    best = next(row for row in summary["history"] if row["step"] == summary["best_step"])
    assert (best["epoch"], scripted.calls) == (best_epoch, evaluated), (scores, summary["history"])
    saved = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert saved["step"] == summary["best_step"] and saved["selection_score"] == scores[best_epoch - 1]


def test_save_best_false_writes_no_best_folder(tmp_path, monkeypatch):
    import offset_cir.eval.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "evaluate", ScriptedEvaluation([1, 2, 1]))
    root = _cirr_copy(tmp_path / "cirr", n_train=2)
    summary = Trainer(_cirr_preset(root, tmp_path / "run", "epochs=3", "save_best=false"), progress=False).fit()
    assert not (tmp_path / "run" / "best").exists()
    assert json.loads((tmp_path / "run" / "best_result.json").read_text())["selection_score"] == 2
    assert summary["best_step"] == 2


@pytest.mark.parametrize("extra, expected", [((), [True]), (("loss_precision=fp32",), [False])])
def test_cirr_preset_computes_the_losses_under_the_training_autocast(tmp_path, monkeypatch, extra, expected):
    from offset_cir.model.offset import OFFSET

    seen = []
    real = OFFSET.loss_from_features

    def loss_from_features(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(OFFSET, "loss_from_features", loss_from_features)
    root = _cirr_copy(tmp_path / "cirr", n_train=2)
    # bf16: the autocast a CPU has (the release's fp16 autocast needs CUDA; precision auto picks it there)
    cfg = _cirr_preset(root, tmp_path / "run", "precision=bf16", "max_steps=1", "eval_every_epochs=0", *extra)
    Trainer(cfg, progress=False).fit()
    assert seen == expected


def test_cirr_preset_loads_the_release_maps_and_stamps_the_setting(tmp_path):
    root = _cirr_copy(tmp_path / "cirr", n_train=2, release_maps=True)
    summary = Trainer(_cirr_preset(root, tmp_path / "run", "epochs=1"), progress=False).fit()
    assert summary["steps"] == 1 and summary["clipseg_maps"] == "release"
    assert json.loads((tmp_path / "run" / "best_result.json").read_text())["clipseg_maps"] == "release"
    assert "clipseg_maps: release" in (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(DatasetError, match=r"is 352x352 \(width x height\) but its image .* is 48x24"):
        Trainer(_cirr_preset(root, tmp_path / "refused", "epochs=1", "data.clipseg_maps=null"), progress=False).fit()
