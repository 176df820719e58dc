"""``offset doctor``: counts, missing files, unreadable images, manifest and comparison."""
from __future__ import annotations

import hashlib
import json

import pytest

from offset_cir.cli import main
from offset_cir.data import get_dataset
from offset_cir.data.doctor import check, compare_manifests
from offset_cir.testing.placeholders import write_benchmark_placeholders


def _mini_cirr(root, n_sets=5):
    """A CIRR-layout copy: n_sets sets of 6 images, one query per set, split val."""
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    names = {f"dev-{s}-{i}-img0": f"./dev/dev-{s}-{i}-img0.png" for s in range(n_sets) for i in range(6)}
    recs = [{"pairid": s, "reference": f"dev-{s}-0-img0", "target_hard": f"dev-{s}-1-img0",
             "target_soft": {f"dev-{s}-1-img0": 1.0}, "caption": "make it red",
             "img_set": {"id": s, "members": [f"dev-{s}-{i}-img0" for i in range(6)], "reference_rank": 0,
                         "target_rank": 1}} for s in range(n_sets)]
    (root / "captions/cap.rc2.val.json").write_text(json.dumps(recs))
    (root / "image_splits/split.rc2.val.json").write_text(json.dumps(names))
    bench = get_dataset("cirr", root)
    write_benchmark_placeholders(bench, "val")
    return bench


def test_all_present(tmp_path):
    bench = _mini_cirr(tmp_path)
    rep = check(bench, progress=False)
    assert rep.ok
    (s,) = rep.splits
    assert (s.split, s.triplets, s.with_target, s.images_needed, s.images_found, s.masks_found) == ("val", 5, 5, 30, 30, 30)
    files = {f["path"]: f for f in rep.manifest["files"]}
    assert len(files) == 2 + 30 + 30
    f = files["dev/dev-0-0-img0.png"]
    data = (tmp_path / "dev/dev-0-0-img0.png").read_bytes()
    assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest() and f["kind"] == "image"
    assert files["captions/cap.rc2.val.json"]["kind"] == "annotation"


def test_missing_unreadable_and_masks(tmp_path):
    bench = _mini_cirr(tmp_path)
    (tmp_path / "dev/dev-1-1-img0.png").unlink()
    (tmp_path / "dev/dev-2-3-img0-segmask.png").unlink()
    (tmp_path / "dev/dev-4-0-img0.png").write_bytes(b"garbage")
    rep = check(bench, progress=False)
    (s,) = rep.splits
    assert s.missing_images == ["dev-1-1-img0"] and s.missing_masks == ["dev-2-3-img0"]
    assert s.unreadable == ["dev-4-0-img0"]
    assert not rep.ok
    text = "\n".join(rep.lines())
    assert "missing images: dev-1-1-img0 (1)" in text and "unreadable images: dev-4-0-img0" in text
    assert text.endswith("PROBLEMS: something a protocol needs is missing or unreadable")
    # masks not required: the missing mask alone is fine, the image problems remain
    (tmp_path / "dev/dev-1-1-img0.png").write_bytes((tmp_path / "dev/dev-1-0-img0.png").read_bytes())
    (tmp_path / "dev/dev-4-0-img0.png").write_bytes((tmp_path / "dev/dev-1-0-img0.png").read_bytes())
    assert not check(bench, progress=False).ok
    assert check(bench, masks=False, progress=False).ok


def test_manifest_comparison(tmp_path):
    a = _mini_cirr(tmp_path / "a")
    b = _mini_cirr(tmp_path / "b")
    (tmp_path / "b/dev/dev-0-2-img0.png").write_bytes((tmp_path / "b/dev/dev-0-3-img0.png").read_bytes())
    (tmp_path / "b/dev/dev-0-4-img0-segmask.png").unlink()
    diff = compare_manifests(check(a, progress=False).manifest, check(b, progress=False).manifest)
    assert diff == {"only_here": ["dev/dev-0-4-img0-segmask.png"], "only_there": [], "differ": ["dev/dev-0-2-img0.png"]}


def test_real_annotations_without_images(shared_data, tmp_path, capsys):
    rc = main(["doctor", "cirr", "--root", str(shared_data / "cirr"), "--split", "val", "--no-open",
               "--manifest", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "val: 4181 triplets (4181 with target), images 0/2297, masks 0/2297" in out
    assert "(2297 in all)" in out and out.count(", dev-") >= 19
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert [f["path"] for f in manifest["files"]] == ["captions/cap.rc2.val.json", "image_splits/split.rc2.val.json"]


def test_cli_ok_and_compare(tmp_path, capsys):
    _mini_cirr(tmp_path / "a")
    _mini_cirr(tmp_path / "b")
    assert main(["doctor", "cirr", "--root", str(tmp_path / "a"), "--manifest", str(tmp_path / "a.json")]) == 0
    assert main(["doctor", "cirr", "--root", str(tmp_path / "b"), "--manifest", str(tmp_path / "b.json"),
                 "--compare", str(tmp_path / "a.json")]) == 0
    assert "copies match" in capsys.readouterr().out
    (tmp_path / "b/dev/dev-0-2-img0.png").write_bytes((tmp_path / "b/dev/dev-0-3-img0.png").read_bytes())
    assert main(["doctor", "cirr", "--root", str(tmp_path / "b"), "--manifest", str(tmp_path / "b.json"),
                 "--compare", str(tmp_path / "a.json"), "--overwrite"]) == 1
    assert "differ: dev/dev-0-2-img0.png" in capsys.readouterr().out


def test_wrong_root(tmp_path, capsys):
    assert main(["doctor", "fashioniq", "--root", str(tmp_path), "--manifest", str(tmp_path / "m.json")]) == 1
    assert "no captions folder" in capsys.readouterr().out
    assert main(["doctor", "shoes", "--root", str(tmp_path / "nope")]) == 2
    assert "root is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["fashioniq", "shoes"])
def test_doctor_on_real_annotations(name, shared_data, tmp_path):
    settings = {"fashioniq": dict(annotations=shared_data / "fashioniq", correction_dicts="none"),
                "shoes": dict(annotations=shared_data / "shoes", correction_dicts="none")}[name]
    bench = get_dataset(name, tmp_path, **settings)
    rep = check(bench, open_images=False, hashes=False, progress=False)
    counts = {s.split: (s.triplets, s.images_needed) for s in rep.splits}
    if name == "fashioniq":
        assert counts == {"train": (18000, 11452 + 19036 + 16121), "val": (6016, 3817 + 6346 + 5373),
                          "test": (6118, 3818 + 6346 + 5374)}
    else:
        assert counts == {"train": (8990, 10000), "eval": (1761, 4658)}
    assert not rep.ok


def test_missing_protocol_split_is_named(tmp_path, capsys):
    """A synthetic copy without its test split: doctor says which protocol cannot run."""
    from offset_cir.data import synthetic

    synthetic.generate(tmp_path / "syn", n_train=3, n_val=3, n_test=4, image_size=32, progress=False, workers=1)
    (tmp_path / "syn/captions/cap.rc2.test.json").unlink()
    (tmp_path / "syn/image_splits/split.rc2.test.json").unlink()
    from offset_cir.eval.protocols import protocol_splits

    bench = get_dataset("synthetic", tmp_path / "syn")
    rep = check(bench, open_images=False, hashes=False, progress=False, protocols=protocol_splits(bench))
    assert rep.missing_splits == {"test": ["synthetic"]} and not rep.ok
    assert main(["doctor", "synthetic", "--root", str(tmp_path / "syn"), "--no-open",
                 "--manifest", str(tmp_path / "m.json")]) == 1
    out = capsys.readouterr().out
    assert "test: MISSING, needed by protocol synthetic" in out
    assert "PROBLEMS" in out
    # asked about train only: the missing test split is not this check's business
    only = check(bench, splits=["train"], open_images=False, hashes=False, progress=False,
                 protocols=protocol_splits(bench))
    assert only.missing_splits == {} and only.ok


def test_manifest_hash_identifies_the_copy(tmp_path):
    from offset_cir.data.doctor import manifest_hash

    a = check(_mini_cirr(tmp_path / "a"), progress=False).manifest
    b = check(_mini_cirr(tmp_path / "b"), progress=False).manifest
    assert a["hash"] == b["hash"] == manifest_hash(b)  # same files, other place and time
    (tmp_path / "b/dev/dev-0-2-img0.png").write_bytes((tmp_path / "b/dev/dev-0-3-img0.png").read_bytes())
    c = check(get_dataset("cirr", tmp_path / "b"), progress=False).manifest
    assert compare_manifests(a, c)["differ"] == ["dev/dev-0-2-img0.png"] and c["hash"] != a["hash"]


def _release_maps_copy(root):
    """A CIRR copy with 48x24 images and, in the release's names, the release's 352x352 CLIPSeg maps."""
    from offset_cir.testing.placeholders import write_release_maps

    bench = _mini_cirr(root)
    write_release_maps(bench, "val")
    return bench


def test_doctor_recognises_the_release_clipseg_maps_and_checks_what_training_checks(tmp_path, capsys):
    from offset_cir.errors import DatasetError
    from offset_cir.model.preprocess import Preprocess

    bench = _release_maps_copy(tmp_path / "cirr")
    rep = check(bench, progress=False)
    (s,) = rep.splits
    assert not rep.ok and len(s.resized_masks) == 30 and len(s.refused_masks) == 30
    text = "\n".join(rep.lines())
    assert "masks: 30 are 352x352 square maps on images of other sizes" in text
    assert "the release's CLIPSeg maps" in text and "clipseg_maps=release" in text and "clipseg_maps=aligned" in text
    # what doctor refuses, training refuses (and the other way round)
    items = bench.image_dataset(bench.split_images("val"), Preprocess(32))
    with pytest.raises(DatasetError, match="352x352"):
        items[0]
    loaded = get_dataset("cirr", tmp_path / "cirr", clipseg_maps="release")
    rep = check(loaded, progress=False)
    assert rep.ok and rep.splits[0].refused_masks == []
    assert "loaded with clipseg_maps=release" in "\n".join(rep.lines())
    loaded.image_dataset(loaded.split_images("val"), Preprocess(32))[0]
    # on the command line: the setting named as the flag that sets it
    assert main(["doctor", "cirr", "--root", str(tmp_path / "cirr"), "--manifest", str(tmp_path / "m.json")]) == 1
    out = capsys.readouterr().out
    assert "--set clipseg_maps=release" in out and "PROBLEMS" in out
    assert main(["doctor", "cirr", "--root", str(tmp_path / "cirr"), "--manifest", str(tmp_path / "m.json"),
                 "--set", "clipseg_maps=aligned"]) == 0
    assert "loaded with --set clipseg_maps=aligned" in capsys.readouterr().out


def test_doctor_names_square_maps_of_another_size_and_mixed_sizes(tmp_path):
    from PIL import Image

    bench = _release_maps_copy(tmp_path / "cirr")
    ids = bench.split_images("val")
    for image_id in ids:
        Image.new("L", (100, 100)).save(bench.mask_path(image_id))
    text = "\n".join(check(bench, progress=False).lines())
    assert "30 are 100x100 square maps of one size" in text and "not at CLIPSeg's input size 352x352" in text
    Image.new("L", (30, 20)).save(bench.mask_path(ids[0]))
    rep = check(get_dataset("cirr", tmp_path / "cirr", clipseg_maps="release"), progress=False)
    assert not rep.ok and len(rep.splits[0].refused_masks) == 30
    assert "30 have another size than their image (2 sizes" in "\n".join(rep.lines())
    (tmp_path / "cirr" / "dev" / f"{ids[1]}-segmask.png").write_bytes(b"not a png")
    rep = check(bench, progress=False)
    assert rep.splits[0].unreadable_masks == [ids[1]]


def test_manifest_goes_beside_the_dataset_and_never_over_another(tmp_path, monkeypatch, capsys):
    _mini_cirr(tmp_path / "cirr")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert main(["doctor", "cirr", "--root", str(tmp_path / "cirr")]) == 0
    path = tmp_path / "cirr-manifest.json"
    assert path.is_file() and not list((tmp_path / "work").iterdir())  # beside the dataset, nothing here
    first = path.read_bytes()
    assert f"manifest: {path}" in capsys.readouterr().out
    assert main(["doctor", "cirr", "--root", str(tmp_path / "cirr")]) == 0  # the same files: left as it is
    assert "the same files as before" in capsys.readouterr().out and path.read_bytes() == first
    (tmp_path / "cirr/dev/dev-0-2-img0.png").write_bytes((tmp_path / "cirr/dev/dev-0-3-img0.png").read_bytes())
    assert main(["doctor", "cirr", "--root", str(tmp_path / "cirr")]) == 2  # another copy's manifest: refused
    captured = capsys.readouterr()
    assert f"manifest {path} exists and describes other files" in captured.err and "--overwrite" in captured.err
    assert "OK: everything the protocols need is present" in captured.out  # the check itself is not lost
    assert path.read_bytes() == first
    assert main(["doctor", "cirr", "--root", str(tmp_path / "cirr"), "--overwrite"]) == 0
    assert path.read_bytes() != first and json.loads(path.read_text())["hash"] == check(
        get_dataset("cirr", tmp_path / "cirr"), progress=False).manifest["hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cirr", "cirr-manifest.json", "work"]  # no temporaries
