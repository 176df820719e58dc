"""FashionIQ loader: known counts, galleries, lazy triplets with placeholder images, errors (docs/model.md#data)."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from offset_cir.data import collate, get_dataset
from offset_cir.testing.placeholders import CodePreprocess, decode, write_placeholder
from offset_cir.errors import DatasetError

CATS = ("dress", "shirt", "toptee")


@pytest.fixture
def fiq(shared_data, tmp_path):
    return get_dataset("fashioniq", tmp_path, annotations=shared_data / "fashioniq",
                       correction_dicts=shared_data / "correction_dicts")


def test_known_counts(fiq):
    assert fiq.splits() == ["train", "val", "test"]
    assert len(fiq.queries("train")) == 18000
    assert len(fiq.queries("val")) == 6016
    test = fiq.queries("test")
    assert len(test) == 6118 and all(q.target is None for q in test)
    assert all(q.target is not None for q in fiq.queries("val"))


def test_galleries_match_split_files(fiq, shared_data):
    sets = {es.name: es for es in fiq.eval_sets("val")}
    assert list(sets) == list(CATS)
    for cat in CATS:
        caps = json.loads((shared_data / f"fashioniq/captions/cap.{cat}.val.json").read_text())
        split = json.loads((shared_data / f"fashioniq/image_splits/split.{cat}.val.json").read_text())
        union = {r["candidate"] for r in caps} | {r["target"] for r in caps}
        es = sets[cat]
        assert len(es.queries) == len(caps)
        assert len(es.galleries["union"]) == len(union)
        assert {g.split("/", 1)[1] for g in es.galleries["union"]} == union
        assert len(es.galleries["full"]) == len(set(split))
        assert set(es.galleries["union"]) <= set(es.galleries["full"])
    assert {c: len(sets[c].galleries["union"]) for c in CATS} == {"dress": 2628, "shirt": 3089, "toptee": 2902}
    assert {c: len(sets[c].galleries["full"]) for c in CATS} == {"dress": 3817, "shirt": 6346, "toptee": 5373}


def test_one_category(shared_data, tmp_path):
    one = get_dataset("fashioniq", tmp_path, annotations=shared_data / "fashioniq", categories="shirt",
                      correction_dicts=shared_data / "correction_dicts")
    assert len(one.queries("val")) == 2038 and {q.group for q in one.queries("val")} == {"shirt"}
    assert [es.name for es in one.eval_sets("val")] == ["shirt"]


def _write(fiq, ids, masks=True):
    codes = {}
    for i in ids:
        codes[i] = len(codes) + 1
        write_placeholder(fiq.image_path(i), codes[i])
        if masks:
            write_placeholder(fiq.mask_path(i), codes[i])
    return codes


def test_triplets_lazy_with_placeholders(fiq, shared_data, tmp_path):
    ds = fiq.triplets("val", CodePreprocess(), train=True, use_masks=True)  # no image read yet
    assert len(ds) == 6016
    first = fiq.queries("val")[:6]
    codes = _write(fiq, {x: None for q in first for x in (q.reference, q.target)})
    assert fiq.image_path(first[0].reference) == tmp_path / "resized_image" / "dress" / (first[0].reference[6:] + ".jpg")
    assert fiq.mask_path(first[0].reference).name.endswith("-seg.png")
    raw = json.loads((shared_data / "fashioniq/captions/cap.dress.val.json").read_text())
    item = ds[0]
    assert set(item) == {"ref_image", "ref_mask", "text", "tgt_image", "tgt_mask", "index"}
    assert decode(item["ref_image"]).item() == codes[f"dress/{raw[0]['candidate']}"]
    assert decode(item["tgt_image"]).item() == codes[f"dress/{raw[0]['target']}"]
    assert decode(item["ref_mask"]).item() == decode(item["ref_image"]).item()
    assert item["text"] == "is shiny and silver with shorter sleeves and fit and flare"
    sub = torch.utils.data.Subset(ds, range(6))
    batches = list(DataLoader(sub, batch_size=4, num_workers=2, collate_fn=collate))
    assert [len(b["text"]) for b in batches] == [4, 2]
    assert batches[0]["tgt_image"].shape == (4, 3, 8, 8) and batches[0]["tgt_mask"].shape == (4, 3, 8, 8)
    got = torch.cat([decode(b["tgt_image"]) for b in batches]).tolist()
    assert got == [codes[q.target] for q in first]


def test_masks_off_and_missing(fiq):
    q = fiq.queries("val")[0]
    _write(fiq, [q.reference, q.target], masks=False)
    no_masks = fiq.triplets("val", CodePreprocess(), train=False, use_masks=False)
    item = no_masks[0]
    assert item["ref_mask"] is None and item["tgt_mask"] is None
    with pytest.raises(DatasetError, match=r"mask not found: .*dress_segmask.*-seg\.png"):
        fiq.triplets("val", CodePreprocess(), train=False, use_masks=True)[0]
    fiq.use_masks = False
    with pytest.raises(DatasetError, match="use_masks=False"):
        fiq.triplets("val", CodePreprocess(), train=False, use_masks=True)


def test_corrupt_image_and_no_targets(fiq):
    q = fiq.queries("val")[0]
    _write(fiq, [q.target])
    path = fiq.image_path(q.reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=f"cannot be read .*{q.reference.split('/')[1]}.jpg"):
        fiq.triplets("val", CodePreprocess(), train=False, use_masks=False)[0]
    with pytest.raises(DatasetError, match="need targets"):
        fiq.triplets("test", CodePreprocess())


def test_own_layout(tmp_path, shared_data):
    bench = get_dataset("fashioniq", tmp_path, annotations=shared_data / "fashioniq", categories="toptee",
                        image_root=tmp_path / "imgs", image_pattern="{name}.png", mask_root=tmp_path / "m",
                        mask_pattern="{category}/{name}.png", correction_dicts="none")
    q = bench.queries("val")[0]
    assert bench.image_path(q.reference) == tmp_path / "imgs" / f"{q.reference[7:]}.png"
    assert bench.mask_path(q.reference) == tmp_path / "m" / "toptee" / f"{q.reference[7:]}.png"


def test_malformed_records(tmp_path):
    (tmp_path / "captions").mkdir()
    (tmp_path / "image_splits").mkdir()
    for c in CATS:
        (tmp_path / f"image_splits/split.{c}.val.json").write_text('["a", "b"]')
        (tmp_path / f"captions/cap.{c}.val.json").write_text(
            json.dumps([{"candidate": "a", "target": "b", "captions": ["x", "y"]}]))
    (tmp_path / "captions/cap.shirt.val.json").write_text(
        json.dumps([{"candidate": "a", "target": "b", "captions": ["x", "y"]}, {"candidate": "a", "target": "b"}]))
    bench = get_dataset("fashioniq", tmp_path, correction_dicts="none")
    with pytest.raises(DatasetError, match=r"cap\.shirt\.val\.json: record 1 has no field 'captions'"):
        bench.queries("val")
    (tmp_path / "captions/cap.shirt.val.json").write_text('[{"candidate": 5, "target": "b", "captions": []}]')
    bench = get_dataset("fashioniq", tmp_path, correction_dicts="none")
    with pytest.raises(DatasetError, match=r"record 0 field 'candidate' is int, expected str"):
        bench.queries("val")
    (tmp_path / "captions/cap.shirt.val.json").write_text('[{"candidate": "a",')
    bench = get_dataset("fashioniq", tmp_path, correction_dicts="none")
    with pytest.raises(DatasetError, match=r"cap\.shirt\.val\.json: not valid JSON"):
        bench.queries("val")
    with pytest.raises(DatasetError, match="unknown split 'train'"):
        bench.queries("train")
