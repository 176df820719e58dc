"""The command line and the demo pipeline, end to end on a tiny budget."""
from __future__ import annotations

import json
import subprocess
import sys

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

    results = run_demo(tmp_path / "out", tmp_path / "data", budget_minutes=2, progress=False,
                       overrides=["max_steps=2", "batch_size=8", "eval_every_epochs=0", "tensorboard=false"],
                       synth_kwargs=dict(n_train=24, n_val=6, n_test=12))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved["runs"]) == {"offset", "offset_wo_fm", "late_fusion"}
    for metrics in saved["runs"].values():
        assert set(METRICS) <= set(metrics)
        assert all(0.0 <= v <= 100.0 for v in metrics.values())
        assert metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= metrics["R@50"]
    assert saved["gallery_size"] == 12 * 6 or saved["gallery_size"] > 12  # every set member is in the gallery
    assert all(info["0"]["steps"] == 2 for info in saved["training"].values())
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Did the masks help" in report and "late fusion" in report
    for png in ("curves.png", "retrievals.png"):
        data = (tmp_path / "out" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
