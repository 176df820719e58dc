"""Preprocessing: the evaluation transform equals torchvision's Resize + CenterCrop, and neither transform's work
grows with how thin its input is (a 1 x 100,000 strip costs about what its output costs)."""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from offset_cir.model.preprocess import WHOLE_RESIZE_MAX_ASPECT, Preprocess, ResizeCentreCrop
from offset_cir.testing.memory import peak_growth, peak_measurable

S = 64  # the tiny and packaged backbones' input side
MODEL_INPUT_BYTES = 3 * S * S * 4  # one float32 image tensor [3, S, S]
OUTPUT_MULTIPLE = 8
THIN = (1, 100_000)  # width x height
# what a decoded copy of an image costs: 4 bytes a pixel (PIL keeps RGB as RGBX) and PIL's pointer to each row
COPY_BYTES = 4 * THIN[0] * THIN[1] + 8 * max(THIN)


def reference(img: Image.Image, size: int) -> Image.Image:
    """torchvision's evaluation geometry, resizing the whole image (the recipe the transform must reproduce)."""
    bicubic = InterpolationMode.BICUBIC
    return T.Compose([T.Resize(size, interpolation=bicubic), T.CenterCrop(size)])(img)


def noise(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def test_everyday_shapes_give_torchvisions_pixels_exactly():
    rng = random.Random(0)
    shapes = [(640, 480), (480, 640), (1920, 1080), (1080, 1920), (64, 64), (63, 65), (10, 7), (3000, 750), (750, 3000)]
    shapes += [(rng.randint(1, 700), 0) for _ in range(40)]
    for i, (w, h) in enumerate(shapes):
        if h == 0:  # a random shape within the whole-resize range
            h = max(1, min(round(w * rng.uniform(1 / WHOLE_RESIZE_MAX_ASPECT, WHOLE_RESIZE_MAX_ASPECT)),
                           int(w * WHOLE_RESIZE_MAX_ASPECT)))
        for size in (32, 64, 224):
            for mode in ("RGB", "L"):  # masks are grayscale
                img = noise(w, h, seed=i, mode=mode)
                got, want = ResizeCentreCrop(size)(img), reference(img, size)
                assert got.size == (size, size) and got.mode == mode
                assert np.array_equal(np.asarray(got), np.asarray(want)), (w, h, size, mode)


def test_thin_shapes_stay_within_the_interpolations_rounding():
    # Beyond the whole-resize range only the kept region is resampled: same bicubic filter and sample centres as
    # the whole-image resize. What may differ is rounding: PIL takes the box in float32 (centres move by < 1e-3 px)
    # and rounds to 8 bits after its first pass, whose order it may choose the other way for a whole image.
    # On smooth content (no clipped overshoot) that is at most 2 levels of 255, and under 0.2 on average.
    rng = random.Random(1)
    for i in range(60):
        short = rng.randint(1, 200)
        long_ = max(short + 1, int(short * rng.uniform(WHOLE_RESIZE_MAX_ASPECT + 0.01, 80)))
        w, h = (short, long_) if i % 2 else (long_, short)
        size = rng.choice([32, 64, 224])
        img = noise(w, h, seed=i).filter(ImageFilter.GaussianBlur(3))
        got = np.asarray(ResizeCentreCrop(size)(img)).astype(int)
        want = np.asarray(reference(img, size)).astype(int)
        diff = np.abs(got - want)
        assert diff.max() <= 2 and diff.mean() < 0.2, (w, h, size, diff.max(), diff.mean())


def test_crop_box_is_the_region_torchvision_keeps():
    # hand-worked: 1 x 100,000 at 224 -> resized to 224 x 22,400,000, crop rows 11,199,888 .. 11,200,112,
    # i.e. source rows 49,999.5 .. 50,000.5 of the one column
    assert ResizeCentreCrop(224).crop_box(1, 100_000) == (0.0, 49_999.5, 1.0, 50_000.5)
    # 640 x 480 at 64 -> 85 x 64, crop columns 10 .. 74 -> source 10 * 640 / 85 .. 74 * 640 / 85
    assert ResizeCentreCrop(64).crop_box(640, 480) == pytest.approx((10 * 640 / 85, 0, 74 * 640 / 85, 480))


def test_the_transform_pickles_for_dataloader_workers():
    pre = pickle.loads(pickle.dumps(Preprocess(S)))
    img = noise(5, 900)
    assert torch.equal(pre.image(img), Preprocess(S).image(img))


needs_proc = pytest.mark.skipif(not peak_measurable(), reason="needs Linux /proc/self/clear_refs to read peak memory")


@needs_proc
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", [THIN, THIN[::-1]], ids=["1xN", "Nx1"])
def test_a_thin_image_costs_about_its_output(shape, train):
    pre = Preprocess(S)
    ordinary, thin = noise(64, 48), noise(*shape)
    pre.image(ordinary, train)  # allocator and transform warmed on an ordinary image
    out, grew = peak_growth(pre.image, thin, train)
    assert out.shape == (3, S, S)
    assert grew <= OUTPUT_MULTIPLE * MODEL_INPUT_BYTES, f"{grew / 2**20:.1f} MiB for a {shape} image"


@needs_proc
def test_a_thin_mask_with_a_shared_crop_costs_about_its_output():
    # the grayscale mask is rendered as RGB first (one copy of the input), then both share one crop
    pre = Preprocess(S, shared_crop=True)
    pre.pair(noise(64, 48), noise(64, 48, mode="L"), train=True)
    (img_t, mask_t), grew = peak_growth(pre.pair, noise(*THIN), noise(*THIN, mode="L"), True)
    assert img_t.shape == mask_t.shape == (3, S, S)
    assert grew <= COPY_BYTES + 2 * OUTPUT_MULTIPLE * MODEL_INPUT_BYTES, f"{grew / 2**20:.1f} MiB"
