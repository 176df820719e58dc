"""Mask geometry: how an image of any shape meets CLIPSeg's fixed square input (docs/model.md#masks).

* ``squash`` (the release): resize the image to the segmenter's input size ignoring its aspect ratio, segment,
  resize the probability map back to the image size.  The segmenter sees a stretched object, and its output
  resolution becomes anisotropic in image coordinates.
* ``letterbox`` (default): pad the image to a centred square (fill colour = the segmenter's normalisation mean,
  i.e. zero after normalisation), resize to the input size, segment, resize the map back to the padded square
  and crop the padding away.  Every pixel keeps its aspect, so the mask is spatially aligned with the image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

GEOMETRIES = ("letterbox", "squash")
# ImageNet mean in 0..255: the colour CLIPSeg's processor normalises to zero.
DEFAULT_FILL = (124, 116, 104)


@dataclass(frozen=True)
class Placement:
    """Where the image sits in the square the segmenter saw (image coordinates)."""

    geometry: str
    image_size: tuple[int, int]  # (width, height)
    canvas_size: tuple[int, int]  # (width, height) of what was resized to the segmenter input
    offset: tuple[int, int]  # (left, top) of the image inside the canvas


def check_geometry(geometry: str) -> str:
    if geometry not in GEOMETRIES:
        from offset_cir.errors import UserInputError

        raise UserInputError(f"--geometry {geometry}: expected one of {', '.join(GEOMETRIES)}")
    return geometry


def to_segmenter(image: Image.Image, input_size: tuple[int, int], geometry: str = "letterbox",
                 fill: tuple[int, int, int] = DEFAULT_FILL) -> tuple[Image.Image, Placement]:
    """Image -> RGB image of the segmenter's ``input_size`` (height, width), and where the image went."""
    check_geometry(geometry)
    image = image.convert("RGB")
    width, height = image.size
    in_h, in_w = input_size
    if geometry == "squash":
        placement = Placement("squash", (width, height), (width, height), (0, 0))
        return image.resize((in_w, in_h), Image.BILINEAR), placement
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    canvas = Image.new("RGB", (side, side), tuple(fill))
    canvas.paste(image, (left, top))
    placement = Placement("letterbox", (width, height), (side, side), (left, top))
    return canvas.resize((in_w, in_h), Image.BILINEAR), placement


def from_segmenter(prob: np.ndarray, placement: Placement) -> np.ndarray:
    """Probability map at the segmenter's resolution -> float32 map [height, width] at the image's size."""
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 2:
        raise ValueError(f"segmenter output must be a 2-D map per image, got shape {prob.shape}")
    width, height = placement.image_size
    canvas_w, canvas_h = placement.canvas_size
    resized = np.asarray(Image.fromarray(prob).resize((canvas_w, canvas_h), Image.BILINEAR))
    left, top = placement.offset
    return np.clip(resized[top : top + height, left : left + width], 0.0, 1.0)


def to_mask_image(prob: np.ndarray) -> Image.Image:
    """Float map in [0, 1] -> 8-bit grayscale mask (0 = background, 255 = dominant portion)."""
    values = np.rint(np.clip(np.asarray(prob, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(values)
