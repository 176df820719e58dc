"""Fashion200K loader: label files, one-word-difference pairs, TIRG test queries (docs/model.md#data)."""
from __future__ import annotations

import pytest

from offset_cir.data import get_dataset
from offset_cir.data.fashion200k import word_change
from offset_cir.errors import DatasetError

TRAIN = [
    ("women/dresses/day/1/1_0.jpeg", "blue floral dress"),
    ("women/dresses/day/2/2_0.jpeg", "red floral dress"),
    ("women/dresses/day/3/3_0.jpeg", "red floral dress"),
    ("women/dresses/day/4/4_0.jpeg", "long black gown"),
    ("women/dresses/day/5/5_0.jpeg", "floral  dress green"),  # extra space: whitespace-normalised
]
TEST = [
    ("women/tops/t/10/10_0.jpeg", "white cotton top"),
    ("women/tops/t/11/11_0.jpeg", "black cotton top"),
    ("women/tops/t/12/12_0.jpeg", "black cotton top"),
    ("women/tops/t/13/13_0.jpeg", "striped silk shirt"),
]


def write_labels(root, cat, split, rows):
    (root / "labels").mkdir(exist_ok=True)
    with open(root / "labels" / f"{cat}_{split}_detect_all.txt", "w") as fh:
        for i, (path, desc) in enumerate(rows):
            fh.write(f"{path}\t0.{9 - i}\t{desc}\n")


@pytest.fixture
def f200k(tmp_path):
    write_labels(tmp_path, "dress", "train", TRAIN)
    write_labels(tmp_path, "top", "test", TEST)
    return get_dataset("fashion200k", tmp_path)


def test_word_change():
    assert word_change("blue floral dress", "red floral dress") == ("blue", "red")
    assert word_change("blue floral dress", "floral dress red") == ("blue", "red")
    assert word_change("blue floral dress", "blue floral dress") is None
    assert word_change("blue floral dress", "floral dress") is None
    assert word_change("blue floral dress", "red silk dress") is None


def test_training_pairs(f200k):
    assert f200k.splits() == ["train", "test"]
    pairs = f200k.queries("train")
    by_ref = {q.reference.split("/")[3]: q for q in pairs}
    assert set(by_ref) == {"1", "2", "3", "5"}  # "long black gown" has no neighbour
    desc = f200k.descriptions("train")
    for q in pairs:
        src, tgt = desc[q.reference], desc[q.target]
        old, new = word_change(src, tgt)
        assert q.text == f"replace {old} with {new}" and q.target_key == tgt
    assert by_ref["2"].target_key in ("blue floral dress", "floral dress green")
    # deterministic for a seed
    again = get_dataset("fashion200k", f200k.root).queries("train")
    assert [(q.reference, q.target) for q in again] == [(q.reference, q.target) for q in pairs]


def test_generated_test_queries_and_gallery(f200k):
    (es,) = f200k.eval_sets("test")
    assert es.galleries["all"] == [p for p, _ in TEST]
    assert len(es.queries) == 3  # images 10, 11, 12 have a neighbour
    q10 = es.queries[0]
    assert q10.text == "replace white with black" and q10.target_key == "black cotton top"
    assert "generated" in es.notes["test_queries"]


def test_test_queries_file(f200k, tmp_path):
    (tmp_path / "labels/test_queries.txt").write_text(
        "women/tops/t/11/11_0.jpeg women/tops/t/10/10_0.jpeg\nwomen/tops/t/10/10_0.jpeg women/tops/t/12/12_0.jpeg\n")
    bench = get_dataset("fashion200k", tmp_path)
    qs = bench.queries("test")
    t = "women/tops/t/"
    assert [(q.reference, q.target, q.text) for q in qs] == [
        (t + "11/11_0.jpeg", t + "10/10_0.jpeg", "replace black with white"),
        (t + "10/10_0.jpeg", t + "12/12_0.jpeg", "replace white with black")]
    (tmp_path / "labels/test_queries.txt").write_text("women/tops/t/10/10_0.jpeg women/tops/t/13/13_0.jpeg\n")
    with pytest.raises(DatasetError, match="line 1: descriptions .* do not differ by one word"):
        get_dataset("fashion200k", tmp_path).queries("test")
    (tmp_path / "labels/test_queries.txt").write_text("only-one-path\n")
    with pytest.raises(DatasetError, match="test_queries.txt: line 1 should be 'source_path target_path'"):
        get_dataset("fashion200k", tmp_path).queries("test")


def test_bad_label_line(tmp_path):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels/dress_train_detect_all.txt").write_text("a.jpeg\t0.5\tred dress\nb.jpeg red dress\n")
    with pytest.raises(DatasetError, match=r"dress_train_detect_all\.txt: line 2 has 1 tab-separated fields"):
        get_dataset("fashion200k", tmp_path).queries("train")
    with pytest.raises(DatasetError, match="no labels folder"):
        get_dataset("fashion200k", tmp_path / "labels").splits()
