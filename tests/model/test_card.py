"""The model card a checkpoint carries: regenerated from its recorded results, the user's own text kept."""
from __future__ import annotations

import json

import pytest
import yaml

from offset_cir import ModelConfig, build_model, save_checkpoint
from offset_cir.errors import UserInputError
from offset_cir.model import card as C


def _result(dataset="cirr", protocol="cirr-val", split="val", r1=12.5, gallery=2297, queries=4181, **extra):
    return {"protocol": protocol, "protocol_description": "CIRR val, gallery all val images", "dataset": dataset,
            "split": split, "gallery": ["all"], "gallery_size": {"all": {"all": gallery}},
            "num_queries": {"all": queries}, "reference_excluded": True, "query_transform": "eval",
            "metrics": {"R@1": r1, "R@5": 30.0, "mean": 21.25}, "selection_score": 42.5, "selection_rule": "sum",
            "versions": {"torch": "2.x"}, "timestamp": "2026-12-01T10:00:00+00:00", **extra}


@pytest.fixture
def ckpt(tmp_path):
    return save_checkpoint(build_model(ModelConfig(backbone="tiny")), tmp_path / "run" / "best")


def _front(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_model_index_holds_every_recorded_result(ckpt):
    from huggingface_hub import ModelCard

    C.record_result(ckpt, _result())
    C.record_result(ckpt, _result("synthetic", "synthetic", "test", r1=50.0, gallery=3600, queries=360))
    path = C.write_model_card(ckpt)
    card = ModelCard.load(path)
    got = {(r.dataset_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    want = {}
    for f in sorted((ckpt / "results").glob("*.json")):  # read back independently of the card module
        r = json.loads(f.read_text())
        want.update({(r["dataset"], k): v for k, v in r["metrics"].items()})
    assert got == want
    text = path.read_text()
    assert "2,297 images, 2,296 candidates per query" in text and "3,600 images, 3,599 candidates per query" in text
    assert "`tiny`" in text and "No training configuration" in text  # no run config beside this folder


def test_regeneration_keeps_user_text_and_front_matter(ckpt):
    C.record_result(ckpt, _result())
    C.write_model_card(ckpt)
    text = (ckpt / "README.md").read_text()
    front = _front(text)
    front["license"] = "mit"
    front["tags"].append("my-tag")
    body = text.split("---\n", 2)[2]
    edited = "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\nMy own intro.\n" + body + "\nMy notes.\n"
    (ckpt / "README.md").write_text(edited)
    C.record_result(ckpt, _result("synthetic", "synthetic", "test", r1=50.0))
    C.write_model_card(ckpt)
    text = (ckpt / "README.md").read_text()
    front = _front(text)
    assert front["license"] == "mit" and "my-tag" in front["tags"] and "synthetic" in front["tags"]
    assert "My own intro." in text and "My notes." in text
    assert text.count(C.BEGIN) == 1 and text.count(C.END) == 1
    assert {r["dataset"]["type"] for r in front["model-index"][0]["results"]} == {"cirr", "synthetic"}


def test_a_hand_written_card_gets_the_block_appended(ckpt):
    (ckpt / "README.md").write_text("# My model\n\nWritten by hand.\n")
    C.record_result(ckpt, _result())
    C.write_model_card(ckpt)
    text = (ckpt / "README.md").read_text()
    assert "# My model\n\nWritten by hand.\n" in text and C.BEGIN in text
    assert _front(text)["library_name"] == "offset-cir"


def test_an_edited_result_shows_as_edited_and_results_are_never_deleted(ckpt):
    C.record_result(ckpt, _result())
    C.record_result(ckpt, _result("synthetic", "synthetic", "test"))
    path = ckpt / "results" / "cirr-cirr-val-val.json"
    data = json.loads(path.read_text())
    data["metrics"]["R@1"] = 99.0
    path.write_text(json.dumps(data))
    (ckpt / "results" / "notes.json").write_text("not json {")
    C.write_model_card(ckpt)
    front = _front((ckpt / "README.md").read_text())
    values = {(r["dataset"]["type"], m["name"]): m["value"] for r in front["model-index"][0]["results"]
              for m in r["metrics"]}
    assert values[("cirr", "R@1")] == 99.0
    assert sorted(p.name for p in (ckpt / "results").iterdir()) == [
        "cirr-cirr-val-val.json", "notes.json", "synthetic-synthetic-test.json"]
    with pytest.raises(UserInputError, match="already exists"):
        C.record_result(ckpt, _result())
    assert json.loads(path.read_text())["metrics"]["R@1"] == 99.0


def test_recipe_from_the_run_and_stale_weights(ckpt):
    from offset_cir.train.config import load_config

    cfg = load_config("synthetic", ["batch_size=7", "seed=5"])
    (ckpt.parent / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))
    (ckpt.parent / "summary.json").write_text(json.dumps({"steps": 120, "epochs": 3, "stopped": "epochs done",
                                                         "seconds": 90.0}))
    C.record_result(ckpt, _result(checkpoint_hash="0" * 64))
    text = C.render_card(ckpt)
    assert "| batch | per process 7, gradient accumulation 1 |" in text and "seed 5" in text and "120 steps, 3 epochs" in text
    assert "recorded for other weights" in text  # the result's checkpoint hash is not these weights'
    assert _front(text)["model-index"][0]["name"] == "run-best"


def test_no_results_no_model_index(ckpt):
    text = C.render_card(ckpt)
    assert "model-index" not in _front(text) and "No result recorded yet" in text


def test_format_result_is_a_table():
    r = _result(gallery=3600, queries=360)
    r["num_queries"]["unseen"] = 40
    text = C.format_result(r)
    assert "{" not in text and "gallery  all: 3,600 images, 3,599 candidates per query" in text
    assert "queries  360" in text and "40 of them with an unseen pair" in text
    assert "mean of R@1, R@5" in text  # what `mean` is
    per_unit = _result("fashioniq", "fashioniq-union")
    per_unit["gallery_size"] = {"union": {"dress": 2628, "shirt": 3089}}
    per_unit["num_queries"] = {"dress": 2017, "shirt": 2038}
    per_unit["metrics"] = {"union/dress/R@10": 1.0, "union/avg/R@10": 2.0, "union/avg/R@50": 3.0, "union/avg": 2.5}
    text = C.format_result(per_unit)
    assert "union/dress: 2,628 images, 2,627 candidates per query" in text and "dress: 2,017" in text
    assert "mean of union/avg/R@10, R@50" in text and "mean over the categories" in text


def test_a_card_with_broken_front_matter_is_left_as_it_is(ckpt):
    """A hand-edited card whose YAML no longer parses is refused, not rebuilt without the user's keys."""
    C.record_result(ckpt, _result())
    broken = "---\nlicense: mit\ntags: [a, b\n---\n\nMy text.\n"
    (ckpt / "README.md").write_text(broken)
    with pytest.raises(UserInputError, match="front matter is not valid YAML"):
        C.write_model_card(ckpt)
    assert (ckpt / "README.md").read_text() == broken


def test_markers_out_of_order_do_not_duplicate_the_block(ckpt):
    C.record_result(ckpt, _result())
    (ckpt / "README.md").write_text(f"intro\n{C.END}\nmiddle\n{C.BEGIN}\nend\n")
    C.write_model_card(ckpt)
    text = (ckpt / "README.md").read_text()
    assert text.count(C.BEGIN) == 1 and "intro" in text and "middle" in text
    C.write_model_card(ckpt)  # regenerating again keeps one block
    assert (ckpt / "README.md").read_text().count(C.BEGIN) == 1


def test_a_failed_result_write_leaves_no_temporary_and_a_written_one_is_on_disk(ckpt, monkeypatch):
    import os

    fsyncs, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    path = C.record_result(ckpt, _result())
    assert len(fsyncs) == 1 and json.loads(path.read_text()) == _result()
    monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full (simulated)")))
    with pytest.raises(OSError, match="disk full"):
        C.record_result(ckpt, _result("synthetic", "synthetic", "test"))
    with pytest.raises(OSError, match="disk full"):
        C.write_model_card(ckpt)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "results"]
