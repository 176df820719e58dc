"""Opening and searching an index (offset_cir.search.index): rankings against a brute-force computation, gallery
references, the checks on opening, query masks; with a small stand-in model (offset_cir.testing.search)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from offset_cir.errors import CheckpointError, DatasetError, UserInputError
from offset_cir.search import Index, build_index
from offset_cir.testing.search import PixelModel, make_gallery, reference_features

torch.set_num_threads(1)
KW = dict(progress=False, device="cpu", distributed=False)


def _ids_of(paths, root):
    return [p.relative_to(root).with_suffix("").as_posix() for p in paths]


def test_build_and_exact_search_match_brute_force(tmp_path):
    root = tmp_path / "g"
    paths = make_gallery(root, n=24)
    model = PixelModel()
    rep = build_index(tmp_path / "idx", root, model=model, batch_size=5, dtype="float32", **KW)
    assert rep.count == 24 and rep.encoded == 24 and rep.search["kind"] == "exact"
    index = Index.open(tmp_path / "idx", model=model)
    ids = _ids_of(paths, root)
    feats = reference_features(model, paths)
    order = np.argsort(ids)
    # stored rows are sorted by id and equal the one-at-a-time features
    assert index.ids == [ids[i] for i in order]
    np.testing.assert_allclose(index.features, feats[order], atol=1e-5)

    ref = tmp_path / "query.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(ref)
    qmask = Image.fromarray(np.full((30, 30), 255, np.uint8), "L")
    hits = index.search(ref, "make it red", k=7, mask=qmask)
    with torch.inference_mode():
        q = model.encode_query(model.preprocess.image(Image.open(ref))[None], model.preprocess.mask(qmask)[None],
                               ["make it red"])[0].numpy()
    scores = feats @ q
    want = np.argsort(-scores)[:7]
    assert [h.id for h in hits] == [ids[i] for i in want]
    np.testing.assert_allclose([h.score for h in hits], scores[want], atol=1e-5)
    hid, hpath, hscore = hits[0]  # a hit unpacks as (id, path, score)
    assert Path(hpath) == paths[want[0]].resolve() and hid == ids[want[0]]
    # k larger than the gallery returns the whole gallery once
    assert len(index.search(ref, "x", k=100, mask=qmask)) == 24


def test_gallery_reference_uses_stored_mask_and_is_excluded(tmp_path):
    root = tmp_path / "g"
    paths = make_gallery(root, n=12)
    m = PixelModel()
    build_index(tmp_path / "idx", root, model=m, dtype="float32", **KW)
    idx = Index.open(tmp_path / "idx", model=m)
    ref_id = "img005"
    hits = idx.search_id(ref_id, "more blue", k=11)
    assert ref_id not in [h.id for h in hits] and len(hits) == 11
    p = paths[5]
    direct = idx.search(p, "more blue", k=12, mask=p.with_name("img005-segmask.png"))
    assert [h for h in direct if h.id != ref_id] == hits
    with pytest.raises(UserInputError, match="no image with id"):
        idx.search_id("../../etc/passwd", "x", k=3)


def test_checkpoint_mismatch_and_bad_arguments(tmp_path):
    root = tmp_path / "g"
    make_gallery(root, n=4)
    build_index(tmp_path / "idx", root, model=PixelModel(seed=0), **KW)
    with pytest.raises(CheckpointError, match="cannot be mixed"):
        build_index(tmp_path / "idx", root, model=PixelModel(seed=1), **KW)
    with pytest.raises(CheckpointError, match="this model hashes to state:"):
        Index.open(tmp_path / "idx", model=PixelModel(seed=1))
    with pytest.raises(CheckpointError, match="dimensions"):
        Index.open(tmp_path / "idx", model=PixelModel(dim=8))
    with pytest.raises(UserInputError, match="not an index"):
        Index.open(tmp_path / "g")
    idx = Index.open(tmp_path / "idx", model=PixelModel(seed=0))
    ref = root / "img001.png"
    with pytest.raises(UserInputError, match="text is empty"):
        idx.search(ref, "  ", k=3, mask=Image.new("L", (4, 4), 255))
    with pytest.raises(UserInputError, match="positive whole number"):
        idx.search(ref, "x", k=0)
    with pytest.raises(UserInputError, match="does not exist"):
        idx.search(tmp_path / "nope.png", "x", k=3, mask=Image.new("L", (4, 4), 255))
    with pytest.raises(DatasetError, match="no images"):
        (tmp_path / "empty").mkdir()
        build_index(tmp_path / "idx4", tmp_path / "empty", model=PixelModel(), **KW)


def test_query_mask_of_another_size_is_refused_naming_both(tmp_path):
    root = tmp_path / "g"
    make_gallery(root, n=4, size=64)
    m = PixelModel()
    build_index(tmp_path / "idx", root, model=m, **KW)
    idx = Index.open(tmp_path / "idx", model=m)
    ref = root / "img001.png"
    bad = tmp_path / "bad-mask.png"
    Image.new("L", (200, 50), 255).save(bad)
    with pytest.raises(UserInputError, match=rf"reference mask {bad} is 200x50 pixels but reference image {ref} "
                                             r"is 64x64"):
        idx.search(ref, "red", k=3, mask=bad)
    with pytest.raises(UserInputError, match="the reference mask is 200x50 pixels but the reference image is 64x64"):
        idx.search(Image.open(ref), "red", k=3, mask=Image.new("L", (200, 50), 255))
    assert len(idx.search(ref, "red", k=3, mask=Image.new("L", (64, 64), 255))) == 3


def test_an_opened_index_is_read_only(tmp_path):
    """Everything an Index holds comes through its constructor; nothing is set on it afterwards."""
    make_gallery(tmp_path / "g", n=4)
    m = PixelModel()
    build_index(tmp_path / "idx", tmp_path / "g", model=m, **KW)
    idx = Index.open(tmp_path / "idx", model=m)
    for name in ("model", "mask_generator", "manifest", "items", "features", "engine", "device", "path", "row_of"):
        with pytest.raises(AttributeError):
            setattr(idx, name, None)
    with pytest.raises(TypeError):
        idx.row_of["img001"] = 0
    with pytest.raises(ValueError):
        idx.features[0, 0] = 1
    # what open() computed, a constructor call reproduces
    again = Index(idx.path, idx.manifest, list(idx.items), idx.features, idx.engine, idx.model, device=idx.device)
    assert again.ids == idx.ids and "img001" in again and "nope" not in again
    ref = tmp_path / "g" / "img001.png"
    assert again.search_id("img001", "red", k=3) == idx.search_id("img001", "red", k=3)
    assert [h.id for h in again.rank(again.query_for_id("img001", "red"), 3, exclude_id="img001")] == \
        [h.id for h in idx.search_id("img001", "red", k=3)]
    assert len(again.search(ref, "red", k=2, mask=ref.with_name("img001-segmask.png"))) == 2
