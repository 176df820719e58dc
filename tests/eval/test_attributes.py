"""Per-attribute top-1 accuracy: a hand-built gallery and a fixed ranking counted by hand; the generator's own
queries ranked with their true target first."""
from __future__ import annotations

import pytest

from offset_cir.errors import DatasetError
from offset_cir.eval.attributes import (asked_attributes, asked_marks, chance_shares, format_attribute_table,
                                        mean_shares, split_table, std_shares, top1_attribute_table)


def _img(shape, colour, size, pattern):
    return {"split": "test", "shape": shape, "colour": colour, "size": size, "pattern": pattern}


IMAGES = {
    "g1": _img("circle", "red", "small", "solid"),
    "g2": _img("star", "red", "large", "striped"),
    "g3": _img("circle", "blue", "small", "solid"),
    "r1": _img("square", "blue", "small", "solid"),
    "r2": _img("star", "green", "medium", "dotted"),
}
QUERIES = [
    # "make it a circle, red, keep the size": asks shape circle, colour red, size small (kept: the reference's)
    {"pairid": 1, "reference": "r1", "target": "g1", "changes": {"shape": ["square", "circle"],
                                                                 "colour": ["blue", "red"]}, "kept": ["size"]},
    # "red, bigger, with stripes": colour red, size large, pattern striped
    {"pairid": 2, "reference": "r2", "target": "g2", "changes": {"colour": ["green", "red"], "size": ["medium", "large"],
                                                                 "pattern": ["dotted", "striped"]}, "kept": []},
    # "add stripes": pattern striped
    {"pairid": 3, "reference": "r1", "target": "g2", "changes": {"pattern": ["solid", "striped"]}, "kept": []},
]
ROWS = [
    {"pairid": 1, "gallery": "all", "top": ["g3", "g1"]},  # circle yes, red no (blue), small yes -> not all
    {"pairid": 2, "gallery": "all", "top": ["g2", "g1"]},  # red, large, striped: all three
    {"pairid": 3, "gallery": "all", "top": []},  # nothing ranked: asked, missed
]


def test_table_equals_a_count_by_hand():
    table = top1_attribute_table(ROWS, QUERIES, IMAGES)
    # by hand: shape asked by q1 (hit); colour by q1 (miss), q2 (hit); size by q1 (hit), q2 (hit);
    # pattern by q2 (hit), q3 (miss); all: q2 only of 3
    assert {c: (t["asked"], t["hits"]) for c, t in table.items()} == {
        "shape": (1, 1), "colour": (2, 1), "size": (2, 2), "pattern": (2, 1), "all": (3, 1)}
    assert {c: t["share"] for c, t in table.items()} == {
        "shape": 100.0, "colour": 50.0, "size": 100.0, "pattern": 50.0, "all": 33.33}


def test_kept_attributes_ask_for_the_references_value():
    assert asked_attributes(QUERIES[0], IMAGES) == {"shape": "circle", "colour": "red", "size": "small"}


def test_an_attribute_nobody_asks_for_has_no_share_and_other_galleries_are_left_out():
    meta = {"queries": {"test": QUERIES[2:]}, "images": IMAGES}
    rows = [{"pairid": 3, "gallery": "all", "top": ["g2"]}, {"pairid": 3, "gallery": "subset", "top": ["g1"]}]
    table = split_table(rows, meta, "test")
    assert table["pattern"] == {"asked": 1, "hits": 1, "share": 100.0}
    assert table["shape"] == {"asked": 0, "hits": 0, "share": None}
    text = format_attribute_table({"m": {c: t["share"] for c, t in table.items()}}, {c: t["asked"] for c, t in
                                                                                    table.items()})
    assert "100.0" in text and " -" in text and "queries asking" in text


def test_a_ranking_of_another_benchmark_is_a_clear_error():
    with pytest.raises(DatasetError, match="pair id 9"):
        top1_attribute_table([{"pairid": 9, "top": ["g1"]}], QUERIES, IMAGES)
    with pytest.raises(DatasetError, match="'nope'"):
        top1_attribute_table([{"pairid": 1, "top": ["nope"]}], QUERIES, IMAGES)
    with pytest.raises(DatasetError, match="no split 'val'"):
        split_table(ROWS, {"queries": {"test": QUERIES}, "images": IMAGES}, "val")


def test_mean_and_std_over_seeds():
    a = top1_attribute_table(ROWS, QUERIES, IMAGES)
    b = top1_attribute_table([{**ROWS[0], "top": ["g1"]}, *ROWS[1:]], QUERIES, IMAGES)  # q1 now all right
    assert b["colour"]["share"] == 100.0 and b["all"]["share"] == 66.67
    assert mean_shares([a, b])["colour"] == 75.0
    assert std_shares([a, b])["colour"] == pytest.approx(35.36, abs=0.01)
    assert std_shares([a])["colour"] is None


def test_sheet_marks_say_which_asked_attributes_an_image_has():
    marks = asked_marks({"queries": {"test": QUERIES}, "images": IMAGES}, "test")
    assert marks(ROWS[0], "g3") == [("shape", True), ("colour", False), ("size", True)]
    assert marks({"pairid": 77}, "g3") == []


def test_the_true_target_has_everything_its_text_asks_for(tmp_path):
    """On the generator's own benchmark, ranking each query's target first scores 100 % in every column: the
    asked values read from the metadata are the target's."""
    from offset_cir.data import synthetic

    synthetic.generate(tmp_path, n_train=3, n_val=3, n_test=12, image_size=32, progress=False, workers=1)
    meta = synthetic.load_meta(tmp_path)
    rows = [{"pairid": q["pairid"], "gallery": "all", "top": [q["target"]]} for q in meta["queries"]["test"]]
    table = split_table(rows, meta, "test")
    assert table["all"] == {"asked": 12, "hits": 12, "share": 100.0}
    assert all(t["share"] in (100.0, None) for t in table.values())
    # and the reference (which differs in every changed attribute) misses every changed one
    rows = [{"pairid": q["pairid"], "top": [q["reference"]]} for q in meta["queries"]["test"] if not q["kept"]]
    assert split_table(rows, meta, "test")["all"]["hits"] == 0


def test_chance_is_the_share_of_the_other_gallery_images_with_the_asked_values():
    meta = {"queries": {"test": QUERIES}, "images": IMAGES}
    chance = chance_shares(meta, "test")
    # gallery: the 5 images; each query's candidates are the 4 others. By hand:
    # q1 (ref r1) asks circle: g1, g3 -> 2/4; red: g1, g2 -> 2/4; small: g1, g3 (r1 excluded) -> 2/4;
    #    all three: g1 -> 1/4
    # q2 (ref r2) asks red: g1, g2 -> 2/4; large: g2 -> 1/4; striped: g2 -> 1/4; all: g2 -> 1/4
    # q3 (ref r1) asks striped: g2 -> 1/4; all: 1/4
    assert chance == {"shape": 50.0, "colour": 50.0, "size": pytest.approx(37.5), "pattern": 25.0,
                      "all": pytest.approx(100 * (1 + 1 + 1) / 12, abs=0.01)}
