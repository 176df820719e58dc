"""CIRR loader (rc2 layout) and the synthetic benchmark read through it (docs/model.md#data)."""
from __future__ import annotations

import json
import shutil

import pytest

from offset_cir.data import get_dataset
from offset_cir.testing.placeholders import CodePreprocess, write_placeholder
from offset_cir.errors import DatasetError


@pytest.fixture
def cirr_root(shared_data, tmp_path):
    """The release layout: <root>/cirr/{captions,image_splits}, images under <root>/img_raw."""
    for sub in ("captions", "image_splits"):
        shutil.copytree(shared_data / "cirr" / sub, tmp_path / "cirr" / sub)
    (tmp_path / "img_raw").mkdir()
    return tmp_path


def test_known_counts(shared_data):
    bench = get_dataset("cirr", shared_data / "cirr")
    assert bench.splits() == ["val", "test1"]
    val = bench.queries("val")
    assert len(val) == 4181
    (es,) = bench.eval_sets("val")
    assert len(es.galleries["all"]) == 2297
    raw = json.loads((shared_data / "cirr/captions/cap.rc2.val.json").read_text())
    assert len({r["img_set"]["id"] for r in raw}) == 503
    assert all(len(q.members) == 6 and q.reference in q.members and q.target in q.members for q in val)
    assert [q.pairid for q in val] == [r["pairid"] for r in raw]
    assert [q.text for q in val] == [r["caption"] for r in raw]  # captions used as written
    test = bench.queries("test")  # alias of test1
    assert len(test) == 4148 and all(q.target is None for q in test)
    assert len(bench.image_table("test1")) == 2315
    assert len(bench.image_table("train")) == 16939


def test_release_layout_paths(cirr_root):
    bench = get_dataset("cirr", cirr_root)
    assert bench.annotations == cirr_root / "cirr" and bench.image_root == cirr_root / "img_raw"
    q = bench.queries("val")[0]
    assert bench.image_path(q.reference) == cirr_root / "img_raw" / "dev" / f"{q.reference}.png"
    assert bench.mask_path(q.reference) == cirr_root / "img_raw" / "dev" / f"{q.reference}-segmask.png"
    other = get_dataset("cirr", cirr_root, mask_root=cirr_root / "masks")
    assert other.mask_path(q.reference) == cirr_root / "masks" / "dev" / f"{q.reference}-segmask.png"
    # train images resolve from their split file even without train captions
    assert bench.image_path("train-11041-2-img0") == cirr_root / "img_raw" / "train" / "34" / "train-11041-2-img0.png"
    with pytest.raises(DatasetError, match="image 'nope' is in no image_splits"):
        bench.image_path("nope")


def test_train_captions_when_present(cirr_root):
    rec = {"pairid": 1, "reference": "train-11041-2-img0", "target_hard": "train-5247-3-img1",
           "target_soft": {"train-5247-3-img1": 1.0}, "caption": "Make it Blue.",
           "img_set": {"id": 7, "members": ["train-11041-2-img0", "train-5247-3-img1"], "reference_rank": 0,
                       "target_rank": 1}}
    (cirr_root / "cirr/captions/cap.rc2.train.json").write_text(json.dumps([rec]))
    bench = get_dataset("cirr", cirr_root)
    assert bench.splits() == ["train", "val", "test1"]
    for name, code in (("train-11041-2-img0", 1), ("train-5247-3-img1", 2)):
        write_placeholder(bench.image_path(name), code)
        write_placeholder(bench.mask_path(name), code)
    item = bench.triplets("train", CodePreprocess(), train=True, use_masks=True)[0]
    assert item["text"] == "Make it Blue." and item["ref_mask"].shape == (3, 8, 8)


def test_malformed_record(cirr_root):
    path = cirr_root / "cirr/captions/cap.rc2.val.json"
    data = json.loads(path.read_text())
    data[2]["pairid"] = "12"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"cap\.rc2\.val\.json: record 2 field 'pairid' is str, expected int"):
        get_dataset("cirr", cirr_root).queries("val")
    del data[2]["caption"]
    data[2]["pairid"] = 12
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="record 2 has no field 'caption'"):
        get_dataset("cirr", cirr_root).queries("val")
    data[2]["caption"] = "fine"
    path.write_text(json.dumps(data))
    (cirr_root / "cirr/image_splits/split.rc2.val.json").write_text('["a list"]')
    with pytest.raises(DatasetError, match="expected a JSON object mapping image name"):
        get_dataset("cirr", cirr_root).eval_sets("val")


def test_wrong_root(tmp_path):
    with pytest.raises(DatasetError, match="no captions folder"):
        get_dataset("cirr", tmp_path).queries("val")


def test_synthetic_benchmark_reads(tmp_path):
    synthetic = pytest.importorskip("offset_cir.data.synthetic")
    synthetic.generate(tmp_path / "syn", n_train=6, n_val=6, n_test=8, image_size=32, progress=False)
    bench = get_dataset("synthetic", tmp_path / "syn")
    assert bench.name == "synthetic" and bench.default_protocol == "synthetic"
    assert bench.splits() == ["train", "val", "test"]
    meta = json.loads((tmp_path / "syn/synthetic_meta.json").read_text())
    for split, n in (("train", 6), ("val", 6), ("test", 8)):
        qs = bench.queries(split)
        assert len(qs) == n and all(q.target for q in qs)
        assert bench.unseen_pairids(split) == {int(p) for p in meta["unseen_pairids"][split]}
    (es,) = bench.eval_sets("test")
    assert es.notes["unseen_pairids"] == sorted(meta["unseen_pairids"]["test"])
    assert len(es.galleries["all"]) == meta["counts"]["test"]["images"]
    ds = bench.triplets("train", CodePreprocess(), train=True, use_masks=True)
    item = ds[0]
    assert item["ref_image"].shape == (3, 8, 8) and item["tgt_mask"].shape == (3, 8, 8)
