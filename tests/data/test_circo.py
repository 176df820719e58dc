"""The CIRCO loader (offset_cir.data.circo) on the real annotation files, with placeholder images."""
from __future__ import annotations

import json

import pytest

from offset_cir.cli import main
from offset_cir.data import get_dataset
from offset_cir.data.circo import EXPECTED, GALLERY_SIZE
from offset_cir.errors import DatasetError


def test_queries_match_the_release(shared_data):
    bench = get_dataset("circo", shared_data / "circo")
    assert bench.splits() == ["val", "test"]
    val, test = bench.queries("val"), bench.queries("test")
    raw = json.loads((shared_data / "circo/annotations/val.json").read_text())
    # the counts SOURCES.md measured from these files
    assert (len(val), len(test)) == (EXPECTED["val"]["triplets"], EXPECTED["test"]["triplets"]) == (220, 800)
    assert [q.pairid for q in val] == list(range(220)) and [q.pairid for q in test] == list(range(800))
    assert len({q.reference for q in val} | {q.reference for q in test}) == 1017
    counts = [len(q.ground_truths) for q in val]
    assert (min(counts), max(counts), round(sum(counts) / len(counts), 2)) == (1, 14, 4.16)
    assert all(q.ground_truths[0] == q.target for q in val)
    assert all(q.target is None and not q.ground_truths and not q.aspects for q in test)
    q = val[0]  # the first record, field by field
    assert (q.reference, q.target, q.text) == (str(raw[0]["reference_img_id"]), str(raw[0]["target_img_id"]),
                                               raw[0]["relative_caption"])
    assert q.ground_truths == tuple(str(g) for g in raw[0]["gt_img_ids"])
    assert q.aspects == tuple(raw[0]["semantic_aspects"])
    assert bench.image_path("243611").relative_to(bench.root).as_posix() == \
        "COCO2017_unlabeled/unlabeled2017/000000243611.jpg"
    assert bench.mask_path("243611").name == "000000243611-segmask.png"  # CIRR's rule: beside the image


def test_caption_template_and_bad_records(shared_data, tmp_path):
    bench = get_dataset("circo", shared_data / "circo", caption_template="{relative_caption} ({shared_concept})")
    raw = json.loads((shared_data / "circo/annotations/test.json").read_text())[3]
    assert bench.queries("test")[3].text == f"{raw['relative_caption']} ({raw['shared_concept']})"
    with pytest.raises(DatasetError, match="caption_template.*'colour'"):
        get_dataset("circo", shared_data / "circo", caption_template="{colour}")
    (tmp_path / "annotations").mkdir()
    rec = dict(json.loads((shared_data / "circo/annotations/val.json").read_text())[0])
    rec["gt_img_ids"] = [rec["target_img_id"], rec["target_img_id"]]
    (tmp_path / "annotations/val.json").write_text(json.dumps([rec]))
    with pytest.raises(DatasetError, match=r"val.json: record 0 \(query 0\) lists a ground truth twice"):
        get_dataset("circo", tmp_path).queries("val")
    rec["gt_img_ids"] = ["355099"]
    (tmp_path / "annotations/val.json").write_text(json.dumps([rec]))
    with pytest.raises(DatasetError, match="record 0 field 'gt_img_ids' must be a non-empty list of image ids"):
        get_dataset("circo", tmp_path).queries("val")
    (tmp_path / "annotations/val.json").unlink()
    with pytest.raises(DatasetError, match="no annotations/val.json or annotations/test.json"):
        get_dataset("circo", tmp_path).splits()


def test_gallery_from_the_folder_or_the_image_list(circo_copy):
    root, codes = circo_copy
    bench = get_dataset("circo", root)
    assert bench.gallery() == sorted(codes, key=int)  # every <digits>.jpg of the folder, not the masks beside them
    (es,) = bench.eval_sets("val")
    assert es.galleries["all"] == bench.gallery() and len(es.queries) == 220
    info = root / "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json"
    info.parent.mkdir(parents=True)
    listed = sorted(codes, key=int)[:5]
    info.write_text(json.dumps({"images": [{"id": int(i), "file_name": f"{int(i):012d}.jpg"} for i in listed]}))
    assert get_dataset("circo", root).gallery() == listed  # the release's list, when it is there


def test_doctor_names_the_release_counts(circo_copy, capsys):
    root, codes = circo_copy
    rc = main(["doctor", "circo", "--root", str(root), "--split", "val", "--no-open", "--no-hash",
               "--manifest", str(root.parent / "m.json")])
    out = capsys.readouterr().out
    assert rc == 1 and "PROBLEMS" in out
    # every image and mask the queries need is there; the gallery is not the release's 123,403 images
    assert f"val: 220 triplets (220 with target), images {len(codes)}/{len(codes)}, masks {len(codes)}/{len(codes)}" in out
    assert f"images_needed: found {len(codes):,}, the release has {GALLERY_SIZE:,}" in out
    assert "triplets: found" not in out
    assert "missing images" not in out


def test_masks_are_planned_where_the_loader_reads_them(circo_copy):
    from offset_cir.masks import find_images, get_layout, plan

    root, codes = circo_copy
    jobs = plan(find_images("circo", root), root, get_layout("circo"))
    bench = get_dataset("circo", root)
    assert len(jobs) == len(codes)  # the masks already there are not images
    assert {j.mask for j in jobs} == {bench.mask_path(i) for i in codes}
