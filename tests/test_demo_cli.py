"""The command line and the demo pipeline, end to end on a tiny budget."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from offset_cir.cli import COMMANDS, main


def test_every_listed_command_module_exists():
    import importlib

    for name, module, _ in COMMANDS:
        mod = importlib.import_module(f"offset_cir.commands.{module}")
        assert callable(mod.add_arguments) and callable(mod.run), name


def test_help_and_info(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "cirr_wo_fm" in out and "wo_revision" in out


def test_bad_input_is_one_clear_line():
    proc = subprocess.run([sys.executable, "-m", "offset_cir.cli", "train", "--config", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: config 'nope'") and "Traceback" not in proc.stderr


def test_demo_end_to_end_small(tmp_path):
    from offset_cir.demo import METRICS, run_demo

    results = run_demo(tmp_path / "out", tmp_path / "data", preset="demo_tiny", progress=False)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved["runs"]) == {"offset", "offset_wo_fm", "late_fusion"}
    for metrics in saved["runs"].values():
        assert set(METRICS) <= set(metrics)
        assert all(0.0 <= v <= 100.0 for v in metrics.values())
        assert metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= metrics["R@50"]
    assert saved["gallery_size"] == 12 * 6 or saved["gallery_size"] > 12  # every set member is in the gallery
    # a fixed number of steps from the preset, the same for all three runs
    assert all(info["0"]["steps"] == 2 and info["0"]["stopped"] == "max_steps" for info in saved["training"].values())
    assert saved["backbone"] == {"name": "tiny", "pretrained": None}
    assert saved["recipe"]["steps"] == 2 and saved["recipe"]["new_lr"] == 1e-3
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Did the masks help" in report and "late fusion" in report
    # what the top result has of what the text asks for: per model, from its own test rankings
    from offset_cir.data.synthetic import load_meta
    from offset_cir.eval.attributes import COLUMNS, chance_shares, rankings_table, shares_of

    meta = load_meta(tmp_path / "data")
    for name in saved["runs"]:
        table = rankings_table(tmp_path / "out" / "seed0" / f"{name}_test_rankings.jsonl", meta, "test")
        assert saved["attributes"][name] == saved["attributes_per_seed"]["0"][name] == shares_of(table)
    assert saved["attributes_asked"]["all"] == saved["test_queries"] and set(saved["attributes_asked"]) == set(COLUMNS)
    assert saved["attributes_chance"] == chance_shares(meta, "test")
    assert "## What the top result has of what the text asks for" in report
    assert f"| OFFSET | {saved['attributes']['offset']['shape']:.1f} |" in report
    assert "the colour the text asks for? For " in report
    for png in ("curves.png", "retrievals.png"):
        data = (tmp_path / "out" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # the search index of the test images, built with OFFSET's best checkpoint; the report ends with how to serve it
    index = tmp_path / "out" / "index"
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["count"] == saved["index"]["images"] == saved["gallery_size"]
    assert report.rstrip().endswith(f"offset serve --index {index}")
    assert saved["serve_command"] == f"offset serve --index {index}"


def test_demo_is_deterministic_per_seed(tmp_path):
    """A rerun (same data, same seed) writes the same metrics: the demo trains for steps, not for a time."""
    from offset_cir.demo import run_demo

    kw = dict(preset="demo_tiny", progress=False, build_search_index=False)
    first = run_demo(tmp_path / "a", tmp_path / "data", **kw)
    second = run_demo(tmp_path / "b", tmp_path / "data", **kw)
    assert first["per_seed"] == second["per_seed"]


def test_demo_prints_the_attribute_table_and_the_verdicts(tmp_path, capsys):
    """`offset demo --seeds ...` (what `make demo-seeds` runs) prints the per-attribute table, mean ± std over the
    seeds, and the verdicts, each seed's colour share among them."""
    out = tmp_path / "out"
    assert main(["demo", "--preset", "demo_tiny", "--out", str(out), "--data", str(tmp_path / "data"), "--seeds",
                 "0", "1", "--no-index", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert "top-1 result has what the text asks for" in printed
    offset_row = next(line for line in printed.splitlines() if line.startswith("OFFSET ") and "±" in line)
    colour, std = saved["attributes"]["offset"]["colour"], saved["attributes_std"]["offset"]["colour"]
    assert f"{colour:.1f} ± {std:.1f}" in offset_row
    per_seed = [saved["attributes_per_seed"][s]["offset"]["colour"] for s in ("0", "1")]
    assert colour == pytest.approx(sum(per_seed) / 2, abs=0.01)
    assert "Did the masks help" in printed and "Per seed, R@10" in printed
    assert f"(per seed: {per_seed[0]:.1f}, {per_seed[1]:.1f})" in printed
    assert "queries asking" in printed and f"{saved['attributes_asked']['colour']}" in printed


def test_demo_preset_is_a_training_config_with_a_demo_section():
    from offset_cir.demo import load_demo_preset
    from offset_cir.train.config import load_config

    section, _ = load_demo_preset("demo")
    assert section["synthetic"]["n_test"] == 500  # the test split keeps its full size
    cfg = load_config("demo")  # `offset train --config demo` reads the same file (the demo: section aside)
    assert cfg.model.backbone == "efficientnet-lite0-minilm" and cfg.model.pretrained == "packaged"
    assert cfg.max_steps and cfg.time_budget_minutes and cfg.max_steps < 1000


def test_demo_recipe_is_the_measured_one():
    """The recipe measured best within the budget (the preset's comment): the image tower's last 8 blocks train over
    cached features of its frozen first half, batch 128 (enough in-batch negatives that share shape, size and
    pattern for the loss to ask for colour), 6000 training triplets, new modules below the rate that collapsed."""
    from offset_cir.demo import load_demo_preset
    from offset_cir.train.config import load_config

    section, _ = load_demo_preset("demo")
    cfg = load_config("demo")
    assert cfg.freeze_backbone and cfg.feature_cache
    assert cfg.trainable_image_blocks == 8 and cfg.trainable_text_blocks == 0
    assert cfg.batch_size >= 128
    assert section["synthetic"]["n_train"] >= 4 * 1500 > section["synthetic"]["n_test"]
    assert cfg.optim.new_lr < 1e-3 and 0 < cfg.optim.backbone_lr <= cfg.optim.new_lr
    assert cfg.eval_every_steps and cfg.max_steps % cfg.eval_every_steps == 0  # the last step is evaluated
    assert cfg.precision == "bf16"  # autocast for OFFSET's matrix products; the trainable blocks stay float32


def test_the_demos_own_data_folder_follows_the_preset_a_named_one_is_kept(tmp_path, monkeypatch):
    from offset_cir.data.synthetic import load_meta
    from offset_cir.demo import DEFAULT_DATA_DIR, demo_benchmark
    from offset_cir.errors import UserInputError

    monkeypatch.chdir(tmp_path)
    small = {"seed": 0, "image_size": 32, "n_train": 6, "n_val": 3, "n_test": 4}
    demo_benchmark(Path(DEFAULT_DATA_DIR), small, progress=False)
    demo_benchmark(Path(DEFAULT_DATA_DIR), {**small, "n_train": 8}, progress=False)  # another preset's data
    assert load_meta(Path(DEFAULT_DATA_DIR))["config"]["n_queries"]["train"] == 8
    mine = tmp_path / "mine"
    demo_benchmark(mine, small, progress=False)
    before = {p: p.stat().st_mtime_ns for p in mine.rglob("*")}
    with pytest.raises(UserInputError, match="other settings"):
        demo_benchmark(mine, {**small, "n_train": 8}, progress=False)
    assert {p: p.stat().st_mtime_ns for p in mine.rglob("*")} == before
