"""The mask of a composed query: made from a file, a box, the whole image, a gallery image's stored mask or the mask
pipeline (:func:`query_mask`, the one place the CLI and the service make it), and what it marks (:func:`mask_extent`:
coverage and bounding box).

A mask is a grayscale image of its image's size; a pixel is *dominant* when its level is at least
:data:`DOMINANT_LEVEL` (half of 255). Boxes are ``(x0, y0, x1, y1)`` in the image's pixels, ``x1`` and ``y1``
exclusive: the box ``(0, 0, w, h)`` is the whole image.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from offset_cir.errors import UserInputError
from offset_cir.search.inputs import check_mask_size, load_pil

#: how a query's mask was made, as the service names it (``mask_mode``); "box" is the CLI's ``--box``
MASK_MODES = ("uploaded", "whole", "stored", "generated")
#: every mode :func:`query_mask` makes ("none": the model uses no mask)
ALL_MODES = MASK_MODES + ("box", "none")
#: the level (0..255) from which a mask pixel counts as dominant
DOMINANT_LEVEL = 128


@dataclasses.dataclass(frozen=True)
class MaskExtent:
    """What a mask marks: the image's ``size`` (w, h), the fraction of dominant pixels (``coverage``) and the box
    around them (``box``, None when no pixel is dominant)."""

    size: tuple[int, int]
    coverage: float
    box: tuple[int, int, int, int] | None

    def describe(self) -> str:
        """``coverage 0.25, box 4,4,20,20 of 24x24`` (for a person)."""
        box = ",".join(map(str, self.box)) if self.box else "none (no dominant pixel)"
        return f"coverage {self.coverage:.4f}, box {box} of {self.size[0]}x{self.size[1]}"


@dataclasses.dataclass(frozen=True)
class QueryMask:
    """The mask a query uses: how it was made (``mode``, one of :data:`ALL_MODES`), the grayscale ``image`` of the
    reference's size (None for "none") and its ``extent``."""

    mode: str
    image: object | None
    extent: MaskExtent | None

    def to_json(self) -> dict:
        """``{"mode", "coverage", "box", "size"}`` as the service answers it (None where no mask is used)."""
        e = self.extent
        return {"mode": self.mode, "coverage": None if e is None else round(e.coverage, 6),
                "box": None if e is None or e.box is None else list(e.box),
                "size": None if e is None else list(e.size)}


def parse_box(text: str, what: str = "--box") -> tuple[int, int, int, int]:
    """``"x0,y0,x1,y1"`` (whole numbers, spaces allowed around them) -> a tuple; a UserInputError naming ``what``."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4 or not all(re.fullmatch(r"[0-9]{1,9}", p) for p in parts):
        raise UserInputError(f"{what} must be four whole numbers x0,y0,x1,y1 (pixels; x1 and y1 exclusive), "
                             f"got {str(text)[:80]!r}")
    return tuple(int(p) for p in parts)


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int], what: str = "--box"):
    """A mask of ``size`` (w, h) whose pixels inside ``box`` are dominant (255) and the others 0."""
    from PIL import Image

    w, h = size
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise UserInputError(f"{what} {x0},{y0},{x1},{y1} is not a box inside the {w}x{h} image: need "
                             f"0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}")
    mask = Image.new("L", (w, h), 0)
    mask.paste(255, (x0, y0, x1, y1))
    return mask


def whole_mask(size: tuple[int, int]):
    """A mask of ``size`` (w, h) with every pixel dominant."""
    from PIL import Image

    return Image.new("L", tuple(size), 255)


def mask_extent(mask) -> MaskExtent:
    """Coverage (fraction of pixels at or above :data:`DOMINANT_LEVEL`) and bounding box of a grayscale mask."""
    a = np.asarray(mask.convert("L")) >= DOMINANT_LEVEL
    h, w = a.shape
    count = int(a.sum())
    if count == 0:
        return MaskExtent((w, h), 0.0, None)
    cols, rows = np.flatnonzero(a.any(axis=0)), np.flatnonzero(a.any(axis=1))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return MaskExtent((w, h), count / float(w * h), box)


def query_mask(image, mode: str, *, mask=None, box=None, generator=None, image_source=None,
               mask_source=None) -> QueryMask:
    """The mask a query with reference ``image`` (PIL) uses, made as ``mode`` says:

    "uploaded" / "stored": ``mask`` (PIL image or path), which must have the image's size; "whole": every pixel;
    "box": ``box`` (x0, y0, x1, y1); "generated": ``generator([image])[0]`` (the mask pipeline); "none": no mask.
    ``image_source`` / ``mask_source`` name the files in messages. UserInputError for what cannot be made."""
    if mode not in ALL_MODES:
        raise UserInputError(f"mask mode {mode!r} is not one of {', '.join(ALL_MODES)}")
    if mode == "none":
        return QueryMask("none", None, None)
    if mode in ("uploaded", "stored"):
        if mask is None:
            raise UserInputError(f"mask mode {mode!r} needs a mask")
        made = load_pil(mask, "reference mask", mode="L")
        check_mask_size(image, made, image_source, mask_source if mask_source is not None else mask)
    elif mode == "whole":
        made = whole_mask(image.size)
    elif mode == "box":
        if box is None:
            raise UserInputError("mask mode 'box' needs a box x0,y0,x1,y1")
        made = box_mask(image.size, tuple(box))
    else:
        if generator is None:
            raise UserInputError("mask mode 'generated' needs the mask pipeline (a captioner and a segmenter)")
        made = load_pil(generator([image])[0], "generated mask", mode="L")
        check_mask_size(image, made, image_source)
    return QueryMask(mode, made, mask_extent(made))


def offered_mask_modes(uses_query_mask: bool, has_pipeline: bool, has_stored: bool) -> tuple[str, ...]:
    """The ``mask_mode`` values a service offers: none for a model that uses no mask; else uploaded and whole,
    stored where the gallery has stored masks, generated where the mask pipeline is configured."""
    if not uses_query_mask:
        return ()
    return tuple(m for m, on in zip(MASK_MODES, (True, True, has_stored, has_pipeline)) if on)
