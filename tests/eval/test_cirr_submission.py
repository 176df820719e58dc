"""CIRR test-server files: the official examples pass, one-defect copies fail with the right message,
and ``offset submit cirr`` writes files that pass (docs/model.md#evaluation)."""
from __future__ import annotations

import json
import re
import shutil

import pytest

import offset_cir
from offset_cir.cli import main
from offset_cir.data import get_dataset
from offset_cir.testing.placeholders import write_benchmark_placeholders
from offset_cir.eval.cirr_submission import predict_test, validate_submission, write_submission
from offset_cir.testing.oracle import OracleModel


@pytest.fixture
def bench(shared_data):
    return get_dataset("cirr", shared_data / "cirr")


@pytest.fixture
def demo(shared_data):
    folder = shared_data / "cirr" / "demo_files"
    return {m: json.loads((folder / f"test1_pred_ranks_{m}.json").read_text()) for m in ("recall", "recall_subset")}


def test_official_examples_pass(shared_data, bench):
    for m in ("recall", "recall_subset"):
        path = shared_data / f"cirr/demo_files/test1_pred_ranks_{m}.json"
        assert validate_submission(path, bench) == []
        assert validate_submission(path, bench, metric=m) == []


def _broken(tmp_path, data, name="broken.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _one_defect(kind, demo, bench):
    rec = json.loads(json.dumps(demo["recall"]))
    sub = json.loads(json.dumps(demo["recall_subset"]))
    first = next(k for k in rec if k not in ("version", "metric"))
    q = next(q for q in bench.queries("test1") if str(q.pairid) == first)
    if kind == "missing pairid":
        del rec[first]
        return rec, rf"pairid {first}: missing"
    if kind == "unknown pairid":
        rec["99999999"] = rec[first]
        return rec, r"pairid 99999999: not a test1 pair id"
    if kind == "version":
        rec["version"] = "rc1"
        return rec, r"\"version\" is 'rc1', expected 'rc2'"
    if kind == "no metric":
        del rec["metric"]
        return rec, r'missing key "metric"'
    if kind == "bad metric":
        rec["metric"] = "precision"
        return rec, r'"metric" is \'precision\''
    if kind == "short list":
        rec[first] = rec[first][:49]
        return rec, rf"pairid {first}: 49 names, expected 50 for recall"
    if kind == "reference":
        rec[first] = [q.reference] + [n for n in rec[first] if n != q.reference][:49]
        return rec, rf"pairid {first}: lists its reference image {q.reference}"
    if kind == "foreign name":
        rec[first] = rec[first][:49] + ["dev-244-0-img0"]
        return rec, rf"pairid {first}: name dev-244-0-img0 is not a test1 image"
    if kind == "duplicate":
        rec[first] = rec[first][:49] + [rec[first][0]]
        return rec, rf"pairid {first}: name {rec[first][0]} listed twice"
    if kind == "not a list":
        rec[first] = "test1-1-1-img0"
        return rec, rf"pairid {first}: value must be a list"
    if kind == "subset outside set":
        outsider = next(n for n in rec[first] if n not in q.members)
        sub[first] = sub[first][:2] + [outsider]
        return sub, rf"pairid {first}: name {outsider} is not in the query's image set"
    if kind == "subset length":
        sub[first] = sub[first] + [n for n in q.members if n not in sub[first] and n != q.reference][:1]
        return sub, rf"pairid {first}: 4 names, expected 3 for recall_subset"
    raise AssertionError(kind)


KINDS = ["missing pairid", "unknown pairid", "version", "no metric", "bad metric", "short list", "reference",
         "foreign name", "duplicate", "not a list", "subset outside set", "subset length"]


@pytest.mark.parametrize("kind", KINDS)
def test_one_defect_fails_with_its_message(kind, demo, bench, tmp_path):
    data, message = _one_defect(kind, demo, bench)
    problems = validate_submission(_broken(tmp_path, data), bench)
    assert len(problems) == 1, problems
    assert re.search(message, problems[0]), (message, problems)


def test_size_and_json_problems(demo, bench, tmp_path):
    big = tmp_path / "big.json"
    big.write_text(json.dumps(demo["recall"], indent=2))  # same content, indented past 5 MB
    assert big.stat().st_size > 5_000_000
    problems = validate_submission(big, bench)
    assert len(problems) == 1 and "under 5 MB" in problems[0]
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "rc2", ')
    assert validate_submission(bad, bench)[0].startswith("not valid JSON")
    lst = _broken(tmp_path, ["rc2"], "list.json")
    assert "expected an object" in validate_submission(lst, bench)[0]


def test_many_problems_are_summarised(demo, bench, tmp_path):
    rec = {"version": "rc2", "metric": "recall"}  # every pair id missing
    problems = validate_submission(_broken(tmp_path, rec), bench)
    assert len(problems) == 21 and problems[-1] == "... and 4128 more: missing pairid"


def test_cli_validate(shared_data, demo, bench, tmp_path, capsys):
    ok = shared_data / "cirr/demo_files/test1_pred_ranks_recall.json"
    assert main(["validate-submission", str(ok), "--annotations", str(shared_data / "cirr")]) == 0
    data, _ = _one_defect("short list", demo, bench)
    broken = _broken(tmp_path, data)
    assert main(["validate-submission", str(broken), "--root", str(shared_data / "cirr")]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "49 names, expected 50" in out


def _oracle_for_test1(bench, codes):
    targets = []
    for q in bench.queries("test1"):
        pick = next(m for m in q.members if m != q.reference)
        targets.append(codes[pick])
    return OracleModel(targets, max(codes.values()) + 1)


@pytest.fixture
def test1_copy(shared_data, tmp_path):
    for sub in ("captions", "image_splits"):
        shutil.copytree(shared_data / "cirr" / sub, tmp_path / "cirr" / sub)
    bench = get_dataset("cirr", tmp_path)
    return bench, write_benchmark_placeholders(bench, "test1", masks=False)


def test_predict_write_validate(test1_copy, tmp_path):
    bench, codes = test1_copy
    assert len(codes) == 2315
    model = _oracle_for_test1(bench, codes)
    model.uses_masks = False
    bench.use_masks = False
    preds = predict_test(model, bench, batch_size=512, progress=False)
    paths = write_submission(preds, tmp_path / "out")
    assert sorted(p.name for p in paths.values()) == ["test1_pred_ranks_recall.json", "test1_pred_ranks_recall_subset.json"]
    for metric, path in paths.items():
        assert validate_submission(path, bench, metric=metric) == []
    rec = json.loads(paths["recall"].read_text())
    assert len(rec) == 4150 and rec["version"] == "rc2" and rec["metric"] == "recall"
    for q in bench.queries("test1")[:50]:
        pick = next(m for m in q.members if m != q.reference)
        assert rec[str(q.pairid)][0] == pick and len(rec[str(q.pairid)]) == 50
        assert preds["recall_subset"][str(q.pairid)][0] == pick


def test_cli_submit(test1_copy, tmp_path, monkeypatch, capsys):
    bench, codes = test1_copy
    model = _oracle_for_test1(bench, codes)
    model.uses_masks = False
    monkeypatch.setattr(offset_cir, "load_checkpoint", lambda path: model, raising=False)
    rc = main(["submit", "cirr", "--root", str(bench.root), "--checkpoint", "x.safetensors",
               "--out", str(tmp_path / "sub"), "--batch-size", "512", "--num-workers", "0", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count(": OK") == 2


def test_validate_submission_cli_names_flags_not_keywords(tmp_path, capsys):
    """A bad --root is reported in the command line's names (--root / --annotations), never as root= keywords."""
    sub = tmp_path / "sub.json"
    sub.write_text("{}")
    empty = tmp_path / "no-cirr-here"
    empty.mkdir()
    assert main(["validate-submission", str(sub), "--root", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "--root" in err and "--annotations" in err
    assert "root=" not in err and "annotations=" not in err
