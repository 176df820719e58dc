"""The release's segmentation files: CLIPSeg's 352x352 maps in the release's names beside non-square images.

``clipseg_maps="release"`` gives exactly the release's tensors (checked against the transform written here with
PIL and torchvision), ``"aligned"`` puts each mask on its image's crop, and every other size stays refused."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from offset_cir.data import get_dataset
from offset_cir.errors import DatasetError
from offset_cir.model.preprocess import Preprocess
from offset_cir.testing.placeholders import write_release_maps

S = 32  # the model's input size in these tests
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenCLIP's (OpenAI) values


def _cirr(root):
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    names = {f"dev-{i}-img0": f"./dev/dev-{i}-img0.png" for i in range(4)}
    recs = [{"pairid": i, "reference": f"dev-{i}-img0", "target_hard": f"dev-{(i + 1) % 4}-img0",
             "target_soft": {}, "caption": "make it red",
             "img_set": {"id": i, "members": list(names), "reference_rank": 0, "target_rank": 1}} for i in range(4)]
    (root / "captions/cap.rc2.val.json").write_text(json.dumps(recs))
    (root / "image_splits/split.rc2.val.json").write_text(json.dumps(names))
    return "cirr", "val", {}


def _fashioniq(root):
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    names = [f"B00{i}" for i in range(4)]
    (root / "image_splits/split.dress.val.json").write_text(json.dumps(names))
    recs = [{"candidate": names[i], "target": names[(i + 1) % 4], "captions": ["is red", "longer"]} for i in range(4)]
    (root / "captions/cap.dress.val.json").write_text(json.dumps(recs))
    return "fashioniq", "val", {"categories": "dress", "correction_dicts": "none"}


def _shoes(root):
    root.mkdir(parents=True, exist_ok=True)
    names = [f"img_womens_clogs_{i}.jpg" for i in range(4)]
    (root / "eval_im_names.txt").write_text("\n".join(names) + "\n")
    (root / "train_im_names.txt").write_text("")
    recs = [{"ReferenceImageName": names[i], "ImageName": names[(i + 1) % 4], "RelativeCaption": "is red"}
            for i in range(4)]
    (root / "relative_captions_shoes.json").write_text(json.dumps(recs))
    return "shoes", "eval", {"correction_dicts": "none"}


LAYOUTS = {"cirr": _cirr, "fashioniq": _fashioniq, "shoes": _shoes}
RELEASE_NAMES = {"cirr": "dev/dev-0-img0-segmask.png", "fashioniq": "resized_image/dress_segmask/B000-seg.png",
                 "shoes": "womens_clogs/0/img_womens_clogs_0-segmask.jpg"}


def _release_copy(tmp_path, name, clipseg_maps=None):
    """A copy of benchmark ``name`` with 48x24 images and the release's 352x352 maps in its names."""
    dataset, split, settings = LAYOUTS[name](tmp_path / name)
    bands = write_release_maps(get_dataset(dataset, tmp_path / name, **settings), split)
    return get_dataset(dataset, tmp_path / name, clipseg_maps=clipseg_maps, **settings), split, bands


def _reference(path, transform) -> torch.Tensor:
    """The release's processing of one file: opened with PIL, converted to RGB, through ``transform``."""
    with Image.open(path) as im:
        return transform(im.convert("RGB"))


def _finish():
    return [T.ToTensor(), T.Normalize(MEAN, STD)]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_release_maps_are_refused_without_the_setting_naming_both_sizes(tmp_path, name):
    bench, split, _ = _release_copy(tmp_path, name)
    assert (tmp_path / name / RELEASE_NAMES[name]).is_file()  # the release's own names
    with Image.open(tmp_path / name / RELEASE_NAMES[name]) as im:
        assert im.size == (352, 352)
    items = bench.query_dataset(split, Preprocess(S))
    with pytest.raises(DatasetError, match=r"is 352x352 \(width x height\) but its image .* is 48x24: a square "
                                           r"CLIPSeg map.*clipseg_maps=release.*clipseg_maps=aligned"):
        items[0]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_release_setting_gives_the_release_tensors(tmp_path, name):
    bench, split, _ = _release_copy(tmp_path, name, clipseg_maps="release")
    bicubic = InterpolationMode.BICUBIC
    evaluation = T.Compose([T.Resize(S, interpolation=bicubic), T.CenterCrop(S), *_finish()])
    queries = bench.queries(split)
    items = bench.query_dataset(split, Preprocess(S))
    for i, q in enumerate(queries):
        item = items[i]
        assert torch.equal(item["ref_image"], _reference(bench.image_path(q.reference), evaluation))
        assert torch.equal(item["ref_mask"], _reference(bench.mask_path(q.reference), evaluation))
    # training: the image and its map cropped independently, in the release's order (image, then mask), by the
    # training transform of OpenCLIP (RandomResizedCrop, scale 0.9-1, bicubic)
    training = T.Compose([T.RandomResizedCrop(S, scale=(0.9, 1.0), interpolation=bicubic), *_finish()])
    triplets = bench.triplets(split, Preprocess(S), train=True)
    torch.manual_seed(7)
    item = triplets[1]
    torch.manual_seed(7)
    q = queries[1]
    expected = [_reference(bench.image_path(q.reference), training), _reference(bench.mask_path(q.reference), training),
                _reference(bench.image_path(q.target), training), _reference(bench.mask_path(q.target), training)]
    for key, want in zip(("ref_image", "ref_mask", "tgt_image", "tgt_mask"), expected):
        assert torch.equal(item[key], want), key


def _band_columns(t: torch.Tensor) -> set[int]:
    """The columns where a [3, S, S] tensor of a black image with a white vertical band is white."""
    return set(torch.nonzero(t[0].mean(dim=0) > 0).flatten().tolist())


def test_aligned_setting_puts_each_mask_on_its_image_and_release_does_not(tmp_path):
    aligned, split, bands = _release_copy(tmp_path, "cirr", clipseg_maps="aligned")
    release = get_dataset("cirr", tmp_path / "cirr", clipseg_maps="release")
    for i, q in enumerate(aligned.queries(split)):
        a = aligned.query_dataset(split, Preprocess(S))[i]
        image_band = _band_columns(a["ref_image"])
        # the centre crop of a 48x24 image scaled to 32: the band's columns, 32/24 pixels each, from column 12 on
        left, right = bands[q.reference]
        assert image_band == set(range(round((left - 12) * S / 24), round((right - 12) * S / 24)))
        assert _band_columns(a["ref_mask"]) == image_band  # the mask lies on its image
        r = release.query_dataset(split, Preprocess(S))[i]
        assert torch.equal(r["ref_image"], a["ref_image"])
        # as the release: the map covers the whole squashed image, so its band sits elsewhere and is narrower
        assert _band_columns(r["ref_mask"]) != image_band
        assert _band_columns(r["ref_mask"]) == set(range(round(left * S / 48), round(right * S / 48)))


@pytest.mark.parametrize("clipseg_maps", [None, "release", "aligned"])
@pytest.mark.parametrize("mask_size", [(20, 20), (352, 300), (24, 48)])
def test_every_other_size_stays_refused_naming_both_sizes(tmp_path, clipseg_maps, mask_size):
    bench, split, _ = _release_copy(tmp_path, "cirr", clipseg_maps=clipseg_maps)
    q = bench.queries(split)[0]
    Image.new("L", mask_size).save(bench.mask_path(q.reference))
    with pytest.raises(DatasetError, match=fr"is {mask_size[0]}x{mask_size[1]} \(width x height\) but its image .* "
                                           r"is 48x24; a mask must have its image's size"):
        bench.query_dataset(split, Preprocess(S))[0]


def test_a_wrong_setting_is_named():
    with pytest.raises(DatasetError, match="clipseg_maps='squash'; expected release, aligned or none"):
        get_dataset("cirr", ".", clipseg_maps="squash")
