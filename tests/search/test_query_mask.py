"""The mask of a composed query (offset_cir.search.query_mask): from a box, the whole image, a file, a stored mask or
the mask pipeline, and its coverage and bounding box, checked against numpy computed here."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from offset_cir.errors import UserInputError
from offset_cir.search.query_mask import (
    MaskExtent,
    box_mask,
    mask_extent,
    offered_mask_modes,
    parse_box,
    query_mask,
    whole_mask,
)
from offset_cir.testing.photos import BoxMaskGenerator


def test_parse_box():
    assert parse_box("1,2,30,40") == (1, 2, 30, 40)
    assert parse_box(" 1, 2 ,30 , 40 ") == (1, 2, 30, 40)
    for bad in ("1,2,3", "1,2,3,4,5", "a,b,c,d", "-1,2,3,4", "1.5,2,3,4", "", "1,,3,4"):
        with pytest.raises(UserInputError, match="--corner must be four whole numbers"):
            parse_box(bad, what="--corner")


def test_box_and_whole_masks_are_their_pixels():
    m = box_mask((7, 5), (2, 1, 6, 4))
    a = np.zeros((5, 7), dtype=np.uint8)
    a[1:4, 2:6] = 255
    assert m.mode == "L" and m.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(m), a)
    np.testing.assert_array_equal(np.asarray(box_mask((7, 5), (0, 0, 7, 5))), np.full((5, 7), 255))
    np.testing.assert_array_equal(np.asarray(whole_mask((7, 5))), np.full((5, 7), 255))
    for box in ((0, 0, 8, 5), (3, 0, 3, 5), (0, 4, 7, 2), (-1, 0, 2, 2)):
        with pytest.raises(UserInputError, match="is not a box inside the 7x5 image"):
            box_mask((7, 5), box)


def test_mask_extent_is_coverage_and_box_of_the_dominant_pixels():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(13, 17)).astype(np.uint8)
    a[:3], a[:, :2], a[:, -4:] = 0, 0, 0  # nothing dominant in the first rows and the outer columns
    dominant = a >= 128
    rows, cols = np.nonzero(dominant)
    e = mask_extent(Image.fromarray(a, "L"))
    assert e == MaskExtent((17, 13), dominant.sum() / (13 * 17),
                           (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
    assert e.box[0] >= 2 and e.box[1] >= 3 and e.box[2] <= 13
    assert mask_extent(Image.new("L", (4, 3), 127)) == MaskExtent((4, 3), 0.0, None)  # soft, below half
    assert mask_extent(Image.new("L", (4, 3), 128)) == MaskExtent((4, 3), 1.0, (0, 0, 4, 3))
    assert mask_extent(Image.new("RGB", (4, 3), (255, 255, 255))).coverage == 1.0
    assert e.describe().startswith(f"coverage {e.coverage:.4f}, box {e.box[0]},{e.box[1]},")
    assert MaskExtent((4, 3), 0.0, None).describe() == "coverage 0.0000, box none (no dominant pixel) of 4x3"


def test_query_mask_in_every_mode(tmp_path):
    image = Image.new("RGB", (20, 10), (1, 2, 3))
    painted = box_mask((20, 10), (5, 2, 15, 8))
    painted.save(tmp_path / "m.png")
    for mode, kwargs, box, coverage in (
            ("uploaded", {"mask": painted}, (5, 2, 15, 8), 0.3),
            ("stored", {"mask": tmp_path / "m.png"}, (5, 2, 15, 8), 0.3),
            ("whole", {}, (0, 0, 20, 10), 1.0),
            ("box", {"box": (0, 0, 10, 5)}, (0, 0, 10, 5), 0.25),
            ("generated", {"generator": BoxMaskGenerator(0.5)}, (5, 2, 15, 7), 0.25)):
        qm = query_mask(image, mode, **kwargs)
        assert qm.mode == mode and qm.image.size == (20, 10) and qm.image.mode == "L"
        assert (qm.extent.box, qm.extent.coverage) == (box, pytest.approx(coverage)), mode
        assert qm.to_json() == {"mode": mode, "coverage": pytest.approx(coverage), "box": list(box), "size": [20, 10]}
    none = query_mask(image, "none", mask=painted)
    assert (none.image, none.extent, none.to_json()["coverage"]) == (None, None, None)


def test_query_mask_refusals_name_what_is_wrong(tmp_path):
    image = Image.new("RGB", (20, 10))
    Image.new("L", (10, 20)).save(tmp_path / "tall.png")
    with pytest.raises(UserInputError, match=r"reference mask .*tall.png is 10x20 pixels but reference image "
                                             r".*photo.png is 20x10"):
        query_mask(image, "uploaded", mask=tmp_path / "tall.png", image_source=tmp_path / "photo.png")
    with pytest.raises(UserInputError, match="reference mask .*gone.png does not exist"):
        query_mask(image, "stored", mask=tmp_path / "gone.png")
    for mode, phrase in (("uploaded", "needs a mask"), ("box", "needs a box"), ("generated", "mask pipeline"),
                         ("painted", "is not one of")):
        with pytest.raises(UserInputError, match=phrase):
            query_mask(image, mode)
    with pytest.raises(UserInputError, match="is not a box inside the 20x10 image"):
        query_mask(image, "box", box=(0, 0, 30, 5))


def test_offered_mask_modes():
    assert offered_mask_modes(False, True, True) == ()
    assert offered_mask_modes(True, False, False) == ("uploaded", "whole")
    assert offered_mask_modes(True, False, True) == ("uploaded", "whole", "stored")
    assert offered_mask_modes(True, True, True) == ("uploaded", "whole", "stored", "generated")
