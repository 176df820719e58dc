"""Shoes loader: known counts, image lookup in womens_<type>/<0|1>, masks beside images (docs/model.md#data)."""
from __future__ import annotations

import json

import pytest

from offset_cir.data import get_dataset
from offset_cir.data.common import load_correction_dict, normalize_caption
from offset_cir.testing.placeholders import CodePreprocess, decode, write_placeholder
from offset_cir.errors import DatasetError


@pytest.fixture
def shoes(shared_data, tmp_path):
    return get_dataset("shoes", tmp_path, annotations=shared_data / "shoes",
                       correction_dicts=shared_data / "correction_dicts")


def test_known_counts(shoes, shared_data):
    assert shoes.splits() == ["train", "eval"]
    assert len(shoes.queries("train")) == 8990
    assert len(shoes.queries("eval")) == 1761
    assert shoes.queries("test") == shoes.queries("eval")  # alias
    (es,) = shoes.eval_sets("eval")
    assert len(es.galleries["all"]) == 4658
    assert len(shoes.image_list("train")) == 10000
    assert es.notes["queries_with_target_equal_reference"] == 1
    every = shoes.queries("train") + shoes.queries("eval")
    assert len(every) == 10751 and sum(q.reference == q.target for q in every) == 27
    # the text is the normalised caption, in file order
    raw = json.loads((shared_data / "shoes/relative_captions_shoes.json").read_text())
    fix = load_correction_dict(shared_data / "correction_dicts/correction_dict_shoes.json")
    evals = set(shoes.image_list("eval"))
    expected = [normalize_caption(r["RelativeCaption"], fix) for r in raw if r["ReferenceImageName"] in evals]
    assert [q.text for q in shoes.queries("eval")] == expected
    # every eval target is an eval (gallery) image
    assert all(q.target in evals for q in shoes.queries("eval"))


def test_image_lookup_and_masks(shoes, tmp_path):
    q = shoes.queries("eval")[0]
    kind = q.reference[len("img_"):q.reference.rindex("_")]
    ref = tmp_path / kind / "1" / q.reference
    write_placeholder(ref, 7)
    write_placeholder(ref.with_name(ref.stem + "-segmask.jpg"), 7)
    tgt = tmp_path / "somewhere" / "else" / q.target  # found by the directory walk
    write_placeholder(tgt, 9)
    write_placeholder(tgt.with_name(tgt.stem + "-segmask.jpg"), 9)
    assert shoes.image_path(q.reference) == ref
    assert shoes.image_path(q.target) == tgt
    assert shoes.mask_path(q.target) == tgt.with_name(tgt.stem + "-segmask.jpg")
    item = shoes.triplets("eval", CodePreprocess(), train=True, use_masks=True)[0]
    assert decode(item["ref_image"]).item() == 7 and decode(item["tgt_mask"]).item() == 9
    assert item["text"] == q.text


def test_missing_image_names_expected_place(shoes, tmp_path):
    q = shoes.queries("train")[3]
    with pytest.raises(DatasetError, match=f"image not found: .*womens_.*/0/{q.reference}"):
        shoes.triplets("train", CodePreprocess(), use_masks=False)[3]


def test_wrong_root(tmp_path):
    bench = get_dataset("shoes", tmp_path)
    with pytest.raises(DatasetError, match="relative_captions_shoes.json not found"):
        bench.queries("eval")
