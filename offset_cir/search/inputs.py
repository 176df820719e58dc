"""What search takes in: images and masks (decoded, their size rule), which side of a model uses masks, the mask
pipeline, and how a string a client sent is quoted in a message."""
from __future__ import annotations

import os

from offset_cir.errors import UserInputError


def uses_target_mask(model) -> bool:
    """Whether gallery (target) images need masks: ``uses_target_mask`` when the model has it (ablation
    "w/o Target_VFM" encodes targets without masks), else ``uses_masks``."""
    return bool(getattr(model, "uses_target_mask", model.uses_masks)) and bool(model.uses_masks)


def uses_query_mask(model) -> bool:
    """Whether a composed query needs the reference's mask (``uses_query_mask`` when the model has it)."""
    return bool(getattr(model, "uses_query_mask", model.uses_masks)) and bool(model.uses_masks)


def load_pil(source, what: str = "image", mode: str = "RGB"):
    """Open ``source`` (PIL image, path or file object) as a PIL image in ``mode``; a clear error otherwise."""
    from PIL import Image

    from offset_cir.images import ImageMissingError, ImageReadError, read_image

    if isinstance(source, Image.Image):
        return source.convert(mode)
    try:
        return read_image(source, mode, what=what)
    except ImageMissingError:
        raise UserInputError(f"{what} {source} does not exist") from None
    except ImageReadError as exc:
        raise UserInputError(f"{what} {source} could not be read as an image: {exc}") from None


def _describe(source, what: str) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"{what} {source}"
    return f"the {what}"


def check_mask_size(image, mask, image_source=None, mask_source=None, kind: str = "reference ") -> None:
    """Refuse a mask whose size differs from its image's (PIL images), naming both sizes (and files when known).
    ``kind`` prefixes the nouns: "reference " for a query, "" for a gallery image."""
    if tuple(mask.size) != tuple(image.size):
        raise UserInputError(
            f"{_describe(mask_source, kind + 'mask')} is {mask.size[0]}x{mask.size[1]} pixels but "
            f"{_describe(image_source, kind + 'image')} is {image.size[0]}x{image.size[1]}: a mask must have "
            f"the size of its image")


def make_mask_generator(captioner=None, segmenter=None, device=None):
    """The mask pipeline (``offset_cir.masks.MaskGenerator``) when both model folders are given, else None."""
    if not captioner and not segmenter:
        return None
    if not (captioner and segmenter):
        raise UserInputError("the mask pipeline needs both --captioner DIR and --segmenter DIR")
    try:
        from offset_cir.masks import MaskGenerator
    except ImportError as exc:
        raise UserInputError(f"the mask pipeline is not installed ({exc}); install the 'segment' extra") from None
    from offset_cir.device import choose_device

    as_spec = (lambda x: str(x) if isinstance(x, os.PathLike) else x)
    return MaskGenerator(captioner=as_spec(captioner), segmenter=as_spec(segmenter),
                         device=str(choose_device(device)))


def short_repr(text, limit: int = 80) -> str:
    """``repr`` of a client-given string for a message, cut to ``limit`` characters (ids can be arbitrarily long)."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"
