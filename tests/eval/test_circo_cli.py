"""CIRCO from the command line: a checkpoint evaluated and submitted, and the server's file checked."""
from __future__ import annotations

import json

import pytest

from offset_cir import ModelConfig, build_model, save_checkpoint
from offset_cir.cli import main


def test_the_official_example_passes_and_each_fault_is_named(shared_data, tmp_path, capsys):
    example = shared_data / "circo/submission_examples/submission_test.json"
    args = ["--dataset", "circo", "--root", str(shared_data / "circo")]
    assert main(["validate-submission", str(example), *args]) == 0
    assert capsys.readouterr().out.strip() == f"{example}: OK"
    good = json.loads(example.read_text())
    faults = {
        "missing": (lambda d: d.pop("17"), "query 17: missing"),
        "duplicate": (lambda d: d["3"].__setitem__(1, d["3"][0]), f"query 3: image id {good['3'][0]} listed twice"),
        "49 ids": (lambda d: d["5"].pop(), "query 5: 49 image ids, expected exactly 50"),
        "strings": (lambda d: d.__setitem__("8", [str(x) for x in d["8"]]),
                    "query 8: 50 image id(s) are JSON str"),
        "unknown": (lambda d: d.__setitem__("800", d["0"]), "key '800': not a test query id"),
    }
    for name, (spoil, message) in faults.items():
        data = json.loads(example.read_text())
        spoil(data)
        bad = tmp_path / f"{name}.json"
        bad.write_text(json.dumps(data))
        assert main(["validate-submission", str(bad), *args]) == 1, name
        out = capsys.readouterr().out
        assert f"{bad}: FAILED" in out and message in out, (name, out)
        assert out.count("\n  ") == 1, (name, out)  # that one fault, and only it


@pytest.fixture
def checkpoints(tmp_path):
    out = []
    for seed in (0, 1):
        import torch

        torch.manual_seed(seed)
        out.append(save_checkpoint(build_model(ModelConfig(backbone="tiny")), tmp_path / f"ckpt{seed}"))
    return out


def test_a_checkpoint_evaluates_and_submits_with_one_encoded_gallery(circo_copy, checkpoints, tmp_path, capsys):
    root, codes = circo_copy
    common = ["--root", str(root), "--device", "cpu", "--num-workers", "0", "--batch-size", "128",
              "--gallery-cache", str(tmp_path / "gc")]
    run = ["eval", "--dataset", "circo", "--protocol", "circo-val", "--no-record", *common]
    assert main([*run, "--checkpoint", str(checkpoints[0]), "--out", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "circo val, protocol circo-val" in out and "mAP@10/cardinality" in out
    assert f"all: {len(codes):,} images, {len(codes):,} candidates per query" in out  # the reference stays in
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["gallery_features"]["images_encoded"] == len(codes) and first["reference_excluded"] is False
    # the same checkpoint again (another variant of the protocol): the gallery is read back, not encoded
    assert main(["eval", "--dataset", "circo", "--protocol", "circo-val-noref", "--no-record", *common,
                 "--checkpoint", str(checkpoints[0]), "--out", str(tmp_path / "b.json")]) == 0
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["gallery_features"]["images_encoded"] == 0 and second["reference_excluded"] is True
    # another checkpoint encodes its own
    assert main([*run, "--checkpoint", str(checkpoints[1]), "--out", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["gallery_features"]["images_encoded"] == len(codes)
    stored = {p: p.stat().st_mtime_ns for p in (tmp_path / "gc").rglob("*.safetensors")}
    # the test-server file from the first checkpoint: its gallery features are those of the evaluation
    capsys.readouterr()
    assert main(["submit", "circo", *common, "--checkpoint", str(checkpoints[0]), "--out", str(tmp_path / "sub")]) == 0
    path = tmp_path / "sub" / "circo_test_submission.json"
    assert f"{path}: OK" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "gc").rglob("*.safetensors")} == stored
    data = json.loads(path.read_text())
    assert len(data) == 800 and all(len(set(v)) == 50 for v in data.values())
    assert main(["validate-submission", str(path), "--dataset", "circo", "--root", str(root)]) == 0


def test_features_of_another_precision_are_not_read_back_as_fp32(circo_copy, checkpoints, tmp_path):
    root, codes = circo_copy
    run = ["eval", "--dataset", "circo", "--protocol", "circo-val", "--no-record", "--root", str(root),
           "--device", "cpu", "--num-workers", "0", "--batch-size", "128", "--gallery-cache", str(tmp_path / "gc"),
           "--checkpoint", str(checkpoints[0])]
    assert main([*run, "--precision", "bf16", "--out", str(tmp_path / "bf16.json")]) == 0
    assert main([*run, "--precision", "fp32", "--out", str(tmp_path / "fp32.json")]) == 0
    bf16, fp32 = (json.loads((tmp_path / f"{p}.json").read_text()) for p in ("bf16", "fp32"))
    assert bf16["precision"]["precision"] == "bf16" and fp32["precision"]["precision"] == "fp32"
    assert fp32["gallery_features"]["images_encoded"] == len(codes)  # its own gallery, not the bf16 one
