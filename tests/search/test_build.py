"""Building and updating an index (offset_cir.search.build): scanning, updates, resume after a crash or a kill, masks,
unreadable files, with a small stand-in model (offset_cir.testing.search.PixelModel)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from offset_cir.errors import DatasetError
from offset_cir.search import Index, MaskRequiredError, build_index, scan_images
from offset_cir.testing.search import PixelModel, copy_items, kill_after_shards, make_gallery, reference_features

torch.set_num_threads(1)
KW = dict(progress=False, device="cpu", distributed=False)


def _ids_of(paths, root):
    return [p.relative_to(root).with_suffix("").as_posix() for p in paths]


def test_scan_images_ids_masks_and_collisions(tmp_path):
    paths = make_gallery(tmp_path / "g", n=6)
    Image.new("RGB", (4, 4)).save(tmp_path / "g" / "img001.jpg")  # same stem as img001.png
    (tmp_path / "g" / "notes.txt").write_text("not an image")
    (tmp_path / "g" / ".hidden.png").write_bytes(b"")
    got = scan_images(tmp_path / "g")
    ids = [i for i, _ in got]
    assert ids == sorted(ids)
    expected = set(_ids_of(paths, tmp_path / "g")) - {"img001"} | {"img001.png", "img001.jpg"}
    assert set(ids) == expected  # masks, text files and hidden files are not gallery images
    assert "sub/img000" in ids
    with pytest.raises(DatasetError, match="does not exist"):
        scan_images(tmp_path / "missing")


def test_manifest_float16_and_model_config(tmp_path):
    make_gallery(tmp_path / "g", n=8)
    model = PixelModel(dim=12)
    build_index(tmp_path / "idx", tmp_path / "g", model=model, **KW)
    man = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert man["format"] == "offset-cir-index" and man["count"] == 8 and man["dim"] == 12
    assert man["dtype"] == "float16" and man["checkpoint"]["hash"].startswith("state:")
    feats = np.load(tmp_path / "idx" / man["features"])
    assert feats.dtype == np.float16 and feats.shape == (8, 12)
    items = [json.loads(x) for x in (tmp_path / "idx" / man["items"]).read_text().splitlines()]
    assert [it["id"] for it in items] == sorted(it["id"] for it in items)
    assert all(it["mask"].endswith("-segmask.png") for it in items)
    assert json.loads((tmp_path / "idx" / "model_config.json").read_text()) == {
        "backbone": "fake", "dim": 12, "use_masks": True, "seed": 0}
    assert not list((tmp_path / "idx" / "shards").iterdir())  # merged shards are removed


def test_two_halves_equal_one_build_and_only_new_images_are_encoded(tmp_path):
    src = tmp_path / "src"
    paths = make_gallery(src, n=20)
    once = PixelModel()
    build_index(tmp_path / "once", src, model=once, batch_size=4, **KW)

    live = tmp_path / "live"
    copy_items(paths[:11], src, live)
    m = PixelModel()
    rep1 = build_index(tmp_path / "halves", live, model=m, batch_size=3, shard_size=4, **KW)
    assert rep1.count == 11 and m.encoded == 11
    copy_items(paths[11:], src, live)
    rep2 = build_index(tmp_path / "halves", live, model=m, batch_size=3, shard_size=4, **KW)
    assert rep2.encoded == 9 and rep2.count == 20 and m.encoded == 20  # the first half was not re-encoded
    a = Index.open(tmp_path / "once", model=once)
    b = Index.open(tmp_path / "halves", model=m)
    assert a.ids == b.ids
    np.testing.assert_allclose(np.asarray(a.features, np.float32), np.asarray(b.features, np.float32), atol=2e-3)
    # nothing new: nothing encoded, nothing rewritten
    gen = json.loads((tmp_path / "halves" / "manifest.json").read_text())["generation"]
    rep3 = build_index(tmp_path / "halves", live, model=m, **KW)
    assert rep3.encoded == 0 and rep3.count == 20 and m.encoded == 20
    assert json.loads((tmp_path / "halves" / "manifest.json").read_text())["generation"] == gen


def test_changed_and_removed_images(tmp_path):
    root = tmp_path / "g"
    paths = make_gallery(root, n=10)
    m = PixelModel()
    build_index(tmp_path / "idx", root, model=m, dtype="float32", **KW)
    # change one image (new content, new mtime), delete another
    Image.new("RGB", (24, 24), (255, 0, 0)).save(paths[3])
    os.utime(paths[3], ns=(time.time_ns(), time.time_ns() + 10**9))
    paths[5].unlink()
    rep = build_index(tmp_path / "idx", root, model=m, dtype="float32", **KW)
    assert rep.encoded == 1 and rep.count == 10  # kept without --prune
    idx = Index.open(tmp_path / "idx", model=m)
    row = idx.row_of[_ids_of([paths[3]], root)[0]]
    np.testing.assert_allclose(idx.features[row], reference_features(m, [paths[3]])[0], atol=1e-5)
    rep = build_index(tmp_path / "idx", root, model=m, dtype="float32", prune=True, **KW)
    assert rep.removed == 1 and rep.count == 9
    assert _ids_of([paths[5]], root)[0] not in Index.open(tmp_path / "idx", model=m).row_of


def test_crash_mid_run_resumes_without_redoing_shards(tmp_path):
    root = tmp_path / "g"
    make_gallery(root, n=20)
    ref = PixelModel()
    build_index(tmp_path / "ref", root, model=ref, batch_size=4, **KW)
    crashing = PixelModel(fail_after=3)  # 3 batches of 4 = 12 images, shards of 4 -> 3 complete shards
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(tmp_path / "idx", root, model=crashing, batch_size=4, shard_size=4, **KW)
    assert not (tmp_path / "idx" / "manifest.json").exists()
    assert len(list((tmp_path / "idx" / "shards").glob("shard-*.json"))) == 3
    again = PixelModel()
    rep = build_index(tmp_path / "idx", root, model=again, batch_size=4, shard_size=4, **KW)
    assert again.encoded == 8 and rep.count == 20 and rep.encoded == 20
    a, b = Index.open(tmp_path / "ref", model=ref), Index.open(tmp_path / "idx", model=again)
    assert a.ids == b.ids
    np.testing.assert_allclose(np.asarray(a.features, np.float32), np.asarray(b.features, np.float32), atol=2e-3)


KILL_SCRIPT = """
import torch
torch.set_num_threads(1)
from offset_cir.testing.search import PixelModel
from offset_cir.search import build_index
build_index({out!r}, {root!r}, model=PixelModel(delay=0.15), batch_size=2, shard_size=2, progress=False,
            device="cpu", distributed=False)
print("finished")
"""


def test_killed_process_resumes(tmp_path):
    """SIGKILL an indexing process after its first shards; a new run encodes only the rest."""
    root = tmp_path / "g"
    make_gallery(root, n=24)
    out = tmp_path / "idx"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(out=str(out), root=str(root)))
    done = kill_after_shards(script, out)
    assert 2 <= done < 12 and not (out / "manifest.json").exists()
    m = PixelModel()
    rep = build_index(out, root, model=m, batch_size=2, shard_size=2, **KW)
    assert m.encoded == 24 - 2 * done and rep.count == 24
    ref = PixelModel()
    build_index(tmp_path / "ref", root, model=ref, **KW)
    a, b = Index.open(tmp_path / "ref", model=ref), Index.open(out, model=m)
    assert a.ids == b.ids
    np.testing.assert_allclose(np.asarray(a.features, np.float32), np.asarray(b.features, np.float32), atol=2e-3)


def test_masks_required_missing_or_unused(tmp_path):
    root = tmp_path / "g"
    make_gallery(root, n=6, masks=False)
    with pytest.raises(DatasetError, match=r"use_masks=True.*6 of 6.*segmask"):
        build_index(tmp_path / "idx", root, model=PixelModel(), **KW)
    # a model trained without masks indexes the same folder
    rep = build_index(tmp_path / "idx2", root, model=PixelModel(uses_masks=False), **KW)
    assert rep.count == 6
    # masks from --masks DIR (flat)
    mdir = tmp_path / "masks"
    mdir.mkdir()
    for p in root.rglob("img*.png"):
        Image.new("L", (24, 24), 255).save(mdir / f"{p.stem}-segmask.png")
    rep = build_index(tmp_path / "idx3", root, model=PixelModel(), masks_dir=mdir, **KW)
    assert rep.count == 6
    idx = Index.open(tmp_path / "idx3", model=PixelModel())
    assert all(Path(it["mask"]).parent == mdir.resolve() for it in idx.items)


def test_mask_pipeline_at_build_and_query_time(tmp_path):
    root = tmp_path / "g"
    make_gallery(root, n=5, masks=False)
    calls = []

    def generator(pils):  # stands in for offset_cir.masks.MaskGenerator
        calls.append(len(pils))
        return [Image.new("L", p.size, 200) for p in pils]

    m = PixelModel()
    build_index(tmp_path / "idx", root, model=m, mask_generator=generator, **KW)
    assert sum(calls) == 5
    idx = Index.open(tmp_path / "idx", model=m)
    assert all(Path(it["mask"]).is_relative_to(tmp_path / "idx" / "masks") for it in idx.items)
    # query without mask and without pipeline: a clear error
    ref = next(root.rglob("img*.png"))
    with pytest.raises(MaskRequiredError, match="trained with masks"):
        idx.search(ref, "red", k=3)
    idx = Index.open(tmp_path / "idx", model=m, mask_generator=generator)  # an index is read-only: open another
    hits = idx.search(ref, "red", k=3)
    assert len(hits) == 3 and sum(calls) == 6
    # same as giving that mask explicitly
    assert hits == idx.search(ref, "red", k=3, mask=Image.new("L", (24, 24), 200))


def test_unreadable_image_is_skipped_and_reported(tmp_path):
    root = tmp_path / "g"
    make_gallery(root, n=6)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    Image.new("L", (24, 24), 255).save(root / "broken-segmask.png")
    m = PixelModel()
    rep = build_index(tmp_path / "idx", root, model=m, **KW)
    assert rep.count == 6 and [s["id"] for s in rep.skipped] == ["broken"]
    assert "broken.png" in rep.skipped[0]["error"] and m.encoded == 6
    # not retried while unchanged; retried (and indexed) once the file is fixed
    again = build_index(tmp_path / "idx", root, model=m, **KW)
    assert again.encoded == 0 and [s["id"] for s in again.skipped] == ["broken"]
    Image.new("RGB", (24, 24), (0, 0, 255)).save(root / "broken.png")
    os.utime(root / "broken.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    fixed = build_index(tmp_path / "idx", root, model=m, **KW)
    assert fixed.count == 7 and fixed.skipped == [] and m.encoded == 7


def test_changed_mask_is_re_encoded(tmp_path):
    root = tmp_path / "g"
    paths = make_gallery(root, n=5, sub_every=0)
    m = PixelModel()
    build_index(tmp_path / "idx", root, model=m, dtype="float32", **KW)
    mask = paths[2].with_name("img002-segmask.png")
    Image.new("L", (24, 24), 255).save(mask)
    os.utime(mask, ns=(time.time_ns(), time.time_ns() + 10**9))
    rep = build_index(tmp_path / "idx", root, model=m, **KW)  # an update keeps the index's float32 storage
    assert rep.encoded == 1 and m.encoded == 6
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["dtype"] == "float32"
    idx = Index.open(tmp_path / "idx", model=m)
    np.testing.assert_allclose(idx.features[idx.row_of["img002"]], reference_features(m, [paths[2]])[0], atol=1e-5)


def _crash_after_first_shard(tmp_path, root):
    """A run that finished one shard (the first 4 ids) and crashed; returns the shard's marker path."""
    crashing = PixelModel(fail_after=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(tmp_path / "idx", root, model=crashing, batch_size=4, shard_size=4, dtype="float32", **KW)
    (marker,) = (tmp_path / "idx" / "shards").glob("shard-*.json")
    return marker


@pytest.mark.parametrize("stale_name", ["shard-00000000", "shard-ffffffff"])
def test_merge_after_a_crash_keeps_the_features_of_the_current_file(tmp_path, stale_name):
    """An image changed between a crash and the rerun: whatever the shard files' order, the merge keeps the
    record that matches the file now, and counts every image once."""
    root = tmp_path / "g"
    paths = make_gallery(root, n=8, sub_every=0)
    marker = _crash_after_first_shard(tmp_path, root)
    for suffix in (".json", ".npy"):  # the stale shard sorts first, or last
        marker.with_suffix(suffix).rename(marker.with_name(stale_name + suffix))
    changed = paths[1]  # img001, in the crashed run's shard
    Image.new("RGB", (24, 24), (250, 10, 10)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    m = PixelModel()
    rep = build_index(tmp_path / "idx", root, model=m, batch_size=4, shard_size=4, dtype="float32", **KW)
    assert m.encoded == 5  # img001 again and the 4 the crash left
    assert rep.count == 8 and rep.encoded == 8 and rep.reused == 0
    idx = Index.open(tmp_path / "idx", model=m)
    np.testing.assert_allclose(idx.features[idx.row_of["img001"]], reference_features(PixelModel(), [changed])[0],
                               atol=1e-5)
    item = idx.item("img001")
    assert (item["size"], item["mtime_ns"]) == (changed.stat().st_size, changed.stat().st_mtime_ns)
    # and the next run finds nothing to do
    again = build_index(tmp_path / "idx", root, model=m, dtype="float32", **KW)
    assert again.encoded == 0 and m.encoded == 5


def test_reused_counts_only_images_not_re_encoded(tmp_path):
    root = tmp_path / "g"
    paths = make_gallery(root, n=10)
    m = PixelModel()
    build_index(tmp_path / "idx", root, model=m, **KW)
    Image.new("RGB", (24, 24), (0, 255, 0)).save(paths[4])
    os.utime(paths[4], ns=(time.time_ns(), time.time_ns() + 10**9))
    rep = build_index(tmp_path / "idx", root, model=m, **KW)
    assert (rep.count, rep.encoded, rep.reused, rep.removed) == (10, 1, 9, 0)
    assert rep.encoded + rep.reused == rep.count


def test_image_that_became_unreadable_leaves_the_index(tmp_path):
    """The record that matches the file now is 'unreadable': its old features are not kept as if current."""
    root = tmp_path / "g"
    paths = make_gallery(root, n=5, sub_every=0)
    m = PixelModel()
    build_index(tmp_path / "idx", root, model=m, **KW)
    paths[2].write_bytes(b"\x89PNG\r\n\x1a\nbroken now")
    os.utime(paths[2], ns=(time.time_ns(), time.time_ns() + 10**9))
    rep = build_index(tmp_path / "idx", root, model=m, **KW)
    assert rep.count == 4 and [s["id"] for s in rep.skipped] == ["img002"] and rep.reused == 4
    assert "img002" not in Index.open(tmp_path / "idx", model=m).row_of


def test_gallery_mask_of_another_size_is_reported_not_indexed(tmp_path):
    root = tmp_path / "g"
    make_gallery(root, n=4, sub_every=0)
    Image.new("L", (200, 50), 255).save(root / "img002-segmask.png")
    rep = build_index(tmp_path / "idx", root, model=PixelModel(), **KW)
    assert rep.count == 3 and [s["id"] for s in rep.skipped] == ["img002"]
    assert "200x50" in rep.skipped[0]["error"] and "24x24" in rep.skipped[0]["error"]


