"""How a stored mask meets its image: at its image's size, or as a CLIPSeg map of the release's download.

A dominant-portion mask is made at its image's size: another size means it belongs to another image or was
resized, and is refused rather than stretched silently. One exception is opted into with the benchmark setting
``clipseg_maps``: the release's pre-computed segmentation download holds CLIPSeg's sigmoid maps saved at CLIPSeg's
input size (:data:`CLIPSEG_MAP_SIZE`, square) whatever the image's size. The release converts such a map to RGB and
sends it through its image's transform on its own, so on a non-square image the map covers the whole (squashed)
image while the image tensor covers its centre crop (``"release"``); ``"aligned"`` first resizes the map to its
image's size, so both get the same crop.
"""
from __future__ import annotations

#: CLIPSeg's input size: the release's segmentation download holds CLIPSeg's sigmoid maps at this size, square
CLIPSEG_MAP_SIZE = 352
#: the values of ``clipseg_maps`` that load such maps (None refuses them)
CLIPSEG_MAPS = ("release", "aligned")


def is_clipseg_map(mask_size: tuple[int, int], image_size: tuple[int, int]) -> bool:
    """Whether a mask of ``mask_size`` on an image of ``image_size`` (width, height) is a map of the release's
    download: square at CLIPSeg's input size, another size than its image."""
    return tuple(mask_size) == (CLIPSEG_MAP_SIZE, CLIPSEG_MAP_SIZE) and tuple(mask_size) != tuple(image_size)


def mask_size_problem(mask_size: tuple[int, int], image_size: tuple[int, int], clipseg_maps: str | None) -> str | None:
    """None when a mask of ``mask_size`` loads on its image under ``clipseg_maps``, else what is wrong, worded to
    follow "mask <path> " in a message."""
    if tuple(mask_size) == tuple(image_size) or (clipseg_maps and is_clipseg_map(mask_size, image_size)):
        return None
    sizes = f"is {mask_size[0]}x{mask_size[1]} (width x height) but its image is {image_size[0]}x{image_size[1]}"
    if is_clipseg_map(mask_size, image_size):
        return (f"{sizes}: a square CLIPSeg map at CLIPSeg's input size, as in the release's segmentation download; "
                "load such maps with clipseg_maps=release (processed as the release does) or clipseg_maps=aligned "
                "(resized to the image first), or remake the masks at their images' size with `offset masks`")
    return f"{sizes}; a mask must have its image's size (remake it with `offset masks`)"


def preprocess_pair(preprocess, img, mask, train: bool, clipseg_maps: str | None = None):
    """(image tensor, mask tensor or None) of a decoded image and its mask (None: no mask) that passed
    :func:`mask_size_problem`: ``preprocess.pair`` on the two, with a CLIPSeg map of another size than its image
    first sent through the image transform on its own (``"release"``) or resized to its image (``"aligned"``)."""
    if mask is not None and mask.size != img.size:
        if clipseg_maps == "release":  # image first, then mask: the random crops drawn in the release's order
            return preprocess.image(img, train), preprocess.mask(mask, train)
        from PIL import Image

        mask = mask.resize(img.size, Image.BILINEAR)
    return preprocess.pair(img, mask, train)
