"""Mask geometry (docs/model.md#masks): letterbox keeps masks aligned, squash reproduces the release's distortion.

A stub segmenter stands in for CLIPSeg: at whatever resolution it receives, it returns the bright square's true
location, grown by ``margin`` of *its own* pixels on every side (a segmenter's boundary error is isotropic in the
space it sees).  The expected masks in image coordinates are worked out here by hand from the resize factors.
No transformers needed.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from offset_cir.masks import MaskGenerator
from offset_cir.masks.geometry import from_segmenter, to_segmenter

S = 64  # the stub's input side (CLIPSeg's 352)


class BrightSquareStub:
    """Segmenter interface: ``input_size`` and ``segment(images, prompts) -> [B, H, W]`` in [0, 1]."""

    def __init__(self, margin: int = 0, size: int = S):
        self.input_size = (size, size)
        self.margin = margin
        self.seen: list[tuple[int, int]] = []
        self.prompts: list[str] = []

    def segment(self, images, prompts):
        out = []
        for im in images:
            self.seen.append(im.size)
            a = np.asarray(im.convert("L"), dtype=np.float32)
            ys, xs = np.nonzero(a > 160)
            m = np.zeros(a.shape, np.float32)
            if len(xs):
                r = self.margin
                m[max(0, ys.min() - r): ys.max() + 1 + r, max(0, xs.min() - r): xs.max() + 1 + r] = 1.0
            out.append(m)
        self.prompts.extend(prompts)
        return np.stack(out)


def square_image(width, height, x0, y0, side):
    a = np.full((height, width, 3), 20, np.uint8)
    a[y0:y0 + side, x0:x0 + side] = 250
    return Image.fromarray(a)


def rect_mask(width, height, x0, x1, y0, y1):
    m = np.zeros((height, width), bool)
    m[max(0, int(round(y0))): int(round(y1)), max(0, int(round(x0))): int(round(x1))] = True
    return m


def iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


# A wide image with the square right of centre, and a tall one with the square near the top.
CASES = [(240, 96, 150, 30, 40), (90, 270, 20, 30, 45)]


@pytest.mark.parametrize("width,height,x0,y0,side", CASES)
def test_both_geometries_find_an_exact_square(width, height, x0, y0, side):
    """margin 0: either way the mask covers the square (squash un-stretches correctly when resizing back)."""
    truth = rect_mask(width, height, x0, x0 + side, y0, y0 + side)
    for geometry in ("letterbox", "squash"):
        stub = BrightSquareStub(0)
        (mask,) = MaskGenerator(captioner=None, segmenter=stub, geometry=geometry, fixed_prompt="square")(
            [square_image(width, height, x0, y0, side)])
        assert mask.mode == "L" and mask.size == (width, height)
        assert stub.seen == [(S, S)] and stub.prompts == ["square"]
        assert iou(np.asarray(mask) >= 128, truth) > 0.9, geometry


@pytest.mark.parametrize("width,height,x0,y0,side", CASES)
def test_letterbox_error_stays_isotropic_and_aligned(width, height, x0, y0, side):
    margin = 4
    stub = BrightSquareStub(margin)
    (mask,) = MaskGenerator(captioner=None, segmenter=stub, geometry="letterbox", fixed_prompt="x")(
        [square_image(width, height, x0, y0, side)])
    # The padded square has side max(W, H); one stub pixel is max(W, H)/S image pixels in both directions.
    grow = margin * max(width, height) / S
    expected = rect_mask(width, height, x0 - grow, x0 + side + grow, y0 - grow, y0 + side + grow)
    got = np.asarray(mask) >= 128
    assert iou(got, expected) > 0.93
    ys, xs = np.nonzero(got)
    # still centred on the square (an offset bug in padding or cropping would move it)
    if x0 - grow >= 0 and x0 + side + grow <= width:
        assert abs(xs.mean() - (x0 + side / 2 - 0.5)) < 1.5
    if y0 - grow >= 0 and y0 + side + grow <= height:
        assert abs(ys.mean() - (y0 + side / 2 - 0.5)) < 1.5


@pytest.mark.parametrize("width,height,x0,y0,side", CASES)
def test_squash_reproduces_the_release_distortion(width, height, x0, y0, side):
    margin = 4
    stub = BrightSquareStub(margin)
    (mask,) = MaskGenerator(captioner=None, segmenter=stub, geometry="squash", fixed_prompt="x")(
        [square_image(width, height, x0, y0, side)])
    # Squashed: one stub pixel is W/S image pixels across and H/S down, so the same error is anisotropic.
    gx, gy = margin * width / S, margin * height / S
    expected = rect_mask(width, height, x0 - gx, x0 + side + gx, y0 - gy, y0 + side + gy)
    g = margin * max(width, height) / S
    isotropic = rect_mask(width, height, x0 - g, x0 + side + g, y0 - g, y0 + side + g)
    got = np.asarray(mask) >= 128
    assert iou(got, expected) > 0.93
    assert iou(got, isotropic) < 0.85  # visibly not what letterbox gives on a non-square image


def test_square_image_geometries_agree():
    img = square_image(128, 128, 30, 50, 40)
    outs = [np.asarray(MaskGenerator(captioner=None, segmenter=BrightSquareStub(3), geometry=g, fixed_prompt="x")(
        [img])[0]).astype(int) for g in ("letterbox", "squash")]
    assert np.abs(outs[0] - outs[1]).max() <= 1


def test_to_and_from_segmenter_hand_worked():
    """A 4x2 image: letterbox pads 1 row above and below; a map of ones over the canvas crops back to 4x2."""
    img = Image.fromarray(np.full((2, 4, 3), 200, np.uint8))
    seg_in, place = to_segmenter(img, (8, 8), "letterbox", fill=(0, 0, 0))
    assert seg_in.size == (8, 8) and place.canvas_size == (4, 4) and place.offset == (0, 1)
    a = np.asarray(seg_in)[:, :, 0]
    assert a[0].max() == 0 and a[-1].max() == 0 and a[3:5].min() == 200  # rows 0-1, 6-7 are padding
    prob = np.zeros((8, 8), np.float32)
    prob[1:7] = 1.0  # the image's rows (2-5) in the 8x8 space, plus the one row the 2x-down filter reaches
    back = from_segmenter(prob, place)
    assert back.shape == (2, 4) and back.min() > 0.99
    prob[1], prob[6] = 0.0, 0.0  # only rows 2-5: the filter mixes in one padding row -> 7/8
    assert np.allclose(from_segmenter(prob, place), 0.875)
    seg_sq, place_sq = to_segmenter(img, (8, 8), "squash")
    assert seg_sq.size == (8, 8) and place_sq.offset == (0, 0)
    assert from_segmenter(np.ones((8, 8), np.float32), place_sq).shape == (2, 4)


def test_batches_and_sizes_any_batch_size():
    imgs = [square_image(w, h, 5, 5, 10) for w, h in [(30, 20), (20, 30), (25, 25), (64, 17), (17, 64)]]
    for bs in (1, 2, 5):
        stub = BrightSquareStub()
        masks = MaskGenerator(captioner=None, segmenter=stub, batch_size=bs, fixed_prompt="x")(imgs)
        assert [m.size for m in masks] == [im.size for im in imgs]
        assert all(m.mode == "L" for m in masks) and len(stub.seen) == 5


def test_prompt_template_fields_and_captions():
    stub = BrightSquareStub()
    gen = MaskGenerator(captioner=None, segmenter=stub, prompt_template="a photo of {caption}")
    gen([square_image(20, 20, 2, 2, 5)] * 2, captions=["a red dress", "shoes"])
    assert stub.prompts == ["a photo of a red dress", "a photo of shoes"]
    with pytest.raises(Exception, match="caption"):
        gen([square_image(20, 20, 2, 2, 5)])  # no captions and no captioner
    with pytest.raises(Exception, match="unknown field"):
        MaskGenerator(captioner=None, segmenter=stub, prompt_template="{colour}")
    assert not MaskGenerator(captioner=None, segmenter=stub, prompt_template="{category}").needs_captions
