"""``offset eval`` as a person uses it: what it prints, what it records, what it refuses to overwrite."""
from __future__ import annotations

import argparse
import json
import re
import shutil

import pytest

from offset_cir import ModelConfig, build_model, save_checkpoint
from offset_cir.cli import COMMANDS, build_parser, main
from offset_cir.data import synthetic


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small synthetic benchmark and a training-run-like folder holding a tiny checkpoint in best/."""
    base = tmp_path_factory.mktemp("evalcli")
    synthetic.generate(base / "syn", n_train=3, n_val=3, n_test=8, image_size=32, progress=False, workers=1)
    save_checkpoint(build_model(ModelConfig(backbone="tiny")), base / "run" / "best")
    return base


@pytest.fixture
def here(world, tmp_path, monkeypatch):
    """A fresh copy of the run (results are written into it) and a working directory of its own."""
    shutil.copytree(world / "run", tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _eval(world, *extra):
    return main(["eval", "--dataset", "synthetic", "--root", str(world / "syn"), "--num-workers", "0",
                 "--device", "cpu", "--batch-size", "64", *extra])


def test_eval_prints_a_table_and_records_with_the_checkpoint(world, here, capsys):
    from huggingface_hub import ModelCard

    ckpt = here / "run" / "best"
    assert _eval(world, "--checkpoint", str(ckpt)) == 0
    out = capsys.readouterr().out
    n_gallery = len(json.loads((world / "syn/image_splits/split.rc2.test.json").read_text()))
    n_queries = len(json.loads((world / "syn/captions/cap.rc2.test.json").read_text()))
    assert f"all: {n_gallery:,} images, {n_gallery - 1:,} candidates per query" in out
    assert "{" not in out and "}" not in out  # no dict printed
    assert f"queries  {n_queries}" in out
    assert "mean of R@1, R@5, R@10, R@50" in out  # the mean line says what it is
    recorded = ckpt / "results" / "synthetic-synthetic-test.json"
    result = json.loads(recorded.read_text())
    assert result["checkpoint"] == str(ckpt) and result["num_queries"]["all"] == n_queries
    assert not (here / "runs").exists()  # recorded in the checkpoint: no second copy under runs/eval
    # the model card is a Hugging Face card whose model-index holds the recorded numbers
    card = ModelCard.load(ckpt / "README.md")
    assert card.data.library_name == "offset-cir" and "composed-image-retrieval" in card.data.tags
    got = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert got == {k: round(v, 2) for k, v in result["metrics"].items()}
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}
    assert f"all: {n_gallery:,} images, {n_gallery - 1:,} candidates per query" in card.text


def test_eval_never_overwrites_a_result_silently(world, here, capsys, monkeypatch):
    import offset_cir

    ckpt = here / "run" / "best"
    assert _eval(world, "--checkpoint", str(ckpt), "--out", "mine.json") == 0
    recorded = ckpt / "results" / "synthetic-synthetic-test.json"
    before = {p: p.read_bytes() for p in (recorded, here / "mine.json")}
    capsys.readouterr()
    # refused before the model is even loaded: nothing is computed to be thrown away
    monkeypatch.setattr(offset_cir, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before refusing"))
    assert _eval(world, "--checkpoint", str(ckpt), "--out", "mine.json") == 2
    err = capsys.readouterr().err
    assert str(recorded) in err and "mine.json" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in before} == before
    monkeypatch.undo()
    monkeypatch.chdir(here)
    # not recording: the runs/eval default is protected the same way
    assert _eval(world, "--checkpoint", str(ckpt), "--no-record") == 0
    default = here / "runs/eval/synthetic-synthetic-test.json"
    first = default.read_bytes()
    assert _eval(world, "--checkpoint", str(ckpt), "--no-record") == 2
    assert default.read_bytes() == first
    assert "--overwrite" in capsys.readouterr().err
    # asked: replaced
    (here / "mine.json").write_text('{"sentinel": 1}')  # so that "replaced" is visible, whatever the clock says
    assert _eval(world, "--checkpoint", str(ckpt), "--out", "mine.json", "--overwrite") == 0
    replaced = json.loads((here / "mine.json").read_text())
    assert "sentinel" not in replaced and "metrics" in replaced


def test_eval_sheet_draws_queries_with_top_results_and_target(world, here, monkeypatch):
    import offset_cir.demo as demo
    import offset_cir.eval.sheet as sheet

    calls = []
    real = sheet.draw_retrieval_sheet
    monkeypatch.setattr(sheet, "draw_retrieval_sheet", lambda rows, *a, **k: calls.append(rows) or real(rows, *a, **k))
    assert _eval(world, "--checkpoint", str(here / "run" / "best"), "--no-record", "--sheet", "3",
                 "--sheet-out", "sheet.png") == 0
    from PIL import Image

    with Image.open(here / "sheet.png") as im:
        assert im.width > 600 and im.height > 3 * 150  # one line of 8 tiles per query
    (rows,) = calls
    queries = json.loads((world / "syn/captions/cap.rc2.test.json").read_text())
    assert [r["pairid"] for r in rows] == [queries[i]["pairid"] for i in (0, 2, 5)]  # 8 queries, 3 spread
    assert all(r["target"] == queries[i]["target_hard"] for r, i in zip(rows, (0, 2, 5)))
    assert not (here / "rankings.jsonl").exists()  # the rankings it needed were temporary
    # the demo draws its retrieval sheet with the same helper
    rk = here / "rk.jsonl"
    rk.write_text("\n".join(json.dumps(r) for r in rows))
    from offset_cir.data import get_dataset

    demo.plot_retrievals(rk, get_dataset("synthetic", world / "syn"), here / "demo.png", n_queries=2)
    assert len(calls) == 2 and len(calls[1]) == 1 and (here / "demo.png").is_file()  # every 40th of 3 rows


def test_eval_prints_what_the_top_result_has_of_what_the_text_asks_for(world, here, capsys):
    """On a synthetic benchmark: the per-attribute top-1 table, recorded and printed, counted again here from the
    rankings and the metadata; the sheet draws the marks."""
    assert _eval(world, "--checkpoint", str(here / "run" / "best"), "--no-record", "--out", "r.json",
                 "--rankings", "rk.jsonl", "--sheet", "2", "--sheet-out", "sheet.png") == 0
    out = capsys.readouterr().out
    table = json.loads((here / "r.json").read_text())["top1_attributes"]
    meta = synthetic.load_meta(world / "syn")
    images = meta["images"]
    queries = {q["pairid"]: q for q in meta["queries"]["test"]}
    colour_asked = colour_hits = 0
    for line in (here / "rk.jsonl").read_text().splitlines():
        row = json.loads(line)
        q = queries[row["pairid"]]
        wanted = q["changes"]["colour"][1] if "colour" in q["changes"] else (
            images[q["reference"]]["colour"] if "colour" in q["kept"] else None)
        if wanted is not None:
            colour_asked += 1
            colour_hits += images[row["top"][0]]["colour"] == wanted
    assert colour_asked > 0 and table["colour"]["asked"] == colour_asked and table["colour"]["hits"] == colour_hits
    assert table["all"]["asked"] == len(queries)
    assert "top-1 result has what the text asks for" in out
    printed = next(line for line in out.splitlines() if line.startswith("this checkpoint")).split()[2:]
    assert printed == [f"{table[c]['share']:.1f}" for c in ("shape", "colour", "size", "pattern", "all")]
    assert (here / "sheet.png").is_file()


def test_eval_names_run_folder_checkpoints_and_missing_paths(world, here, capsys):
    save_checkpoint(build_model(ModelConfig(backbone="tiny")), here / "run" / "last")
    assert _eval(world, "--checkpoint", str(here / "run")) == 2
    err = capsys.readouterr().err
    assert f"{here / 'run' / 'best'} (best validation score)" in err and str(here / "run" / "last") in err
    assert "Traceback" not in err
    assert _eval(world, "--checkpoint", str(here / "nowhere")) == 2
    assert f"checkpoint {here / 'nowhere'} does not exist" in capsys.readouterr().err


def test_hub_checkpoint_is_evaluated_not_recorded_in_the_cache(world, here, monkeypatch, capsys):
    commit = "c" * 40
    store = here / "hub" / "models--org--tiny"
    (store / "refs").mkdir(parents=True)
    (store / "refs" / "main").write_text(commit)
    shutil.copytree(here / "run" / "best", store / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(here / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _eval(world, "--checkpoint", "hf-hub:org/tiny") == 0
    assert not (store / "snapshots" / commit / "results").exists()
    res = json.loads((here / "runs/eval/synthetic-synthetic-test.json").read_text())
    assert res["checkpoint"] == "hf-hub:org/tiny"


def test_manifest_hash_is_recorded_and_shown_on_the_card(world, here, capsys):
    from offset_cir.data.doctor import manifest_hash

    assert main(["doctor", "synthetic", "--root", str(world / "syn"), "--no-open", "--manifest", "m.json"]) == 0
    manifest = json.loads((here / "m.json").read_text())
    assert f"manifest: m.json ({len(manifest['files'])} files, {manifest_hash(manifest)}" in capsys.readouterr().out
    ckpt = here / "run" / "best"
    assert _eval(world, "--checkpoint", str(ckpt), "--manifest", "m.json") == 0
    rec = json.loads((ckpt / "results/synthetic-synthetic-test.json").read_text())["dataset_manifest"]
    assert rec["hash"] == manifest_hash(manifest) and rec["files"] == len(manifest["files"])
    assert f"manifest `{manifest_hash(manifest)}`" in (ckpt / "README.md").read_text()
    # doctor's default manifest beside the dataset folder is picked up when it describes this --root
    assert main(["doctor", "synthetic", "--root", str(world / "syn"), "--no-open"]) == 0
    assert _eval(world, "--checkpoint", str(ckpt), "--no-record", "--out", "auto.json") == 0
    auto = json.loads((here / "auto.json").read_text())["dataset_manifest"]
    assert auto["path"] == str((world / "syn-manifest.json").resolve()) and auto["hash"] == manifest_hash(manifest)
    # a default manifest that no longer matches the data is not recorded; an explicit one is refused
    some = next(f for f in manifest["files"] if f["kind"] == "image")
    victim = world / "syn" / some["path"]
    saved = victim.read_bytes()
    try:
        victim.write_bytes(saved + b"\0")
        assert _eval(world, "--checkpoint", str(ckpt), "--no-record", "--out", "stale.json") == 0
        assert "dataset_manifest" not in json.loads((here / "stale.json").read_text())
        assert _eval(world, "--checkpoint", str(ckpt), "--manifest", "m.json", "--overwrite") == 2
        assert "no longer describes this copy" in capsys.readouterr().err
    finally:
        victim.write_bytes(saved)
    # a manifest of another dataset is refused by name
    other = dict(manifest, dataset="shoes")
    (here / "other.json").write_text(json.dumps(other))
    assert _eval(world, "--checkpoint", str(ckpt), "--manifest", "other.json", "--overwrite") == 2
    assert "describes dataset 'shoes', not synthetic" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["eval", "--dataset", "cirr", "--checkpoint", "x"],
    ["submit", "cirr", "--checkpoint", "x", "--out", "sub"],
])
def test_data_errors_name_the_flags_not_keywords(argv, here, capsys):
    (here / "empty").mkdir()
    argv = argv[:1] + (["--root", str(here / "empty")]) + argv[1:]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--root or --annotations" in err and "root=" not in err and "annotations=" not in err


def test_doctor_names_the_flags_not_keywords(here, capsys):
    (here / "empty").mkdir()
    assert main(["doctor", "fashioniq", "--root", str(here / "empty"), "--manifest", "m.json"]) == 1
    out = capsys.readouterr().out
    assert "--root or --annotations" in out and "root=" not in out


def test_cli_wording():
    from offset_cir.commands.eval import cli_wording

    assert cli_wording("(give root= or annotations=)") == "(give --root or --annotations)"
    assert cli_wording("image_root=/a, mask_root=/b") == "--image-root /a, --mask-root /b"
    assert cli_wording("no labels folder (give root= or labels=)") == "no labels folder (give --root or --set labels=)"
    assert cli_wording("override data.root=x") == "override data.root=x"  # train's own names stay
    # a key=value inside a path or a Python call is left alone (Hydra-style run folders are common)
    assert cli_wording("checkpoint /exp/seed=3/best does not exist") == "checkpoint /exp/seed=3/best does not exist"
    assert cli_wording("/data/version=2/cap.json: not valid JSON") == "/data/version=2/cap.json: not valid JSON"
    assert cli_wording("ModelConfig(seed=0) failed") == "ModelConfig(seed=0) failed"


def test_unknown_setting_is_named_as_the_flag(world, here, capsys):
    assert _eval(world, "--checkpoint", "x", "--set", "colour=red") == 2
    err = capsys.readouterr().err
    assert "--set colour=... is not a setting of this dataset" in err and "keyword argument" not in err


def _subparser(name):
    parser = build_parser([name])
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


@pytest.mark.parametrize("name", [c[0] for c in COMMANDS])
def test_every_command_help_works_and_shows_real_defaults(name, capsys):
    with pytest.raises(SystemExit) as stop:
        main([name, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    flat = re.sub(r"-\s+", "-", " ".join(text.split()))  # argparse wraps lines at spaces and hyphens
    for action in _subparser(name)._actions:
        if (action.help and action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS)
                and "default" not in action.help.lower()):
            # the formatter adds the default of every flag whose help does not already say it
            assert f"(default: {action.default})" in flat, action.option_strings


@pytest.mark.parametrize("name", ["eval", "submit", "doctor", "info"])
def test_every_flag_of_these_commands_says_what_it_does(name):
    sub = _subparser(name)
    assert [a.dest for a in sub._actions if not a.help] == []


def test_eval_help_shows_numeric_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "forward pass (default: 32)" in text and "worker processes (default: 2)" in text


def test_a_result_that_cannot_be_recorded_is_kept(world, here, capsys):
    ckpt = here / "run" / "best"
    (ckpt / "results").write_text("a file where the results folder would go")
    assert _eval(world, "--checkpoint", str(ckpt)) == 0
    (kept,) = (here / "runs" / "eval").glob("synthetic-synthetic-test-*.json")
    assert json.loads(kept.read_text())["metrics"]
    assert f"results: runs/eval/{kept.name}" in capsys.readouterr().out


def test_eval_device_follows_the_one_device_rule(world, here, capsys):
    # --device goes through offset_cir.device.choose_device: CUDA asked for on a machine without it is a user error
    # naming the flag (before: a torch traceback from model.to), and nothing is recorded.
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    ckpt = here / "run" / "best"
    rc = main(["eval", "--dataset", "synthetic", "--root", str(world / "syn"), "--num-workers", "0",
               "--device", "cuda", "--checkpoint", str(ckpt)])
    assert rc == 2
    assert "--device 'cuda': CUDA is not available" in capsys.readouterr().err
    assert not (ckpt / "results").exists()


def test_eval_precision_is_fp32_unless_asked_and_recorded(world, here, capsys):
    ckpt = here / "run" / "best"
    assert _eval(world, "--checkpoint", str(ckpt), "--out", "fp32.json", "--no-record") == 0
    assert _eval(world, "--checkpoint", str(ckpt), "--out", "bf16.json", "--no-record", "--precision", "bf16") == 0
    fp32, bf16 = (json.loads((here / f"{p}.json").read_text()) for p in ("fp32", "bf16"))
    assert fp32["precision"]["precision"] == "fp32" and fp32["precision"]["requested"] == "fp32"
    assert bf16["precision"] == {"precision": "bf16", "requested": "bf16", "reason": "asked for",
                                 "fp32_seconds": None, "bf16_seconds": None, "cosine": None}
    assert set(bf16["metrics"]) == set(fp32["metrics"])
