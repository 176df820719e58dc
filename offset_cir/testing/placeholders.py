"""Tiny placeholder images for checking loaders and protocols without the benchmark's images.

Each placeholder is an 8x8 black-and-white image whose pixels spell an integer code (32 bits, row-major, one
bit per pixel), so a test double (:mod:`offset_cir.testing.oracle`) can tell which file a tensor came from even
after JPEG compression. Never written into the repository: tests write them under ``tmp_path``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SIZE = 8
BITS = 32


def placeholder_image(code: int):
    """An 8x8 RGB PIL image whose first 32 pixels (row-major) are white where ``code`` has a 1 bit."""
    from PIL import Image

    if not 0 <= code < 2 ** BITS:
        raise ValueError(f"code {code} does not fit in {BITS} bits")
    bits = np.array([(code >> i) & 1 for i in range(BITS)] + [0] * (SIZE * SIZE - BITS), dtype=np.uint8)
    arr = np.repeat((bits * 255).reshape(SIZE, SIZE, 1), 3, axis=2)
    return Image.fromarray(arr, "RGB")


def decode(pixels: torch.Tensor) -> torch.Tensor:
    """Codes from tensors [..., 3, 8, 8] holding pixel values 0..255 (as :class:`CodePreprocess` gives)."""
    bits = (pixels.float().mean(dim=-3).flatten(-2)[..., :BITS] > 127.5).long()
    weights = torch.tensor([1 << i for i in range(BITS)], dtype=torch.long, device=bits.device)
    return (bits * weights).sum(-1)


def write_placeholder(path: Path, code: int) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = placeholder_image(code)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=95)
    else:
        img.save(path)
    return None


def write_benchmark_placeholders(bench, split: str, masks: bool = True, codes: dict[str, int] | None = None,
                                 ids=None) -> dict[str, int]:
    """Write a placeholder for every image ``split``'s protocol needs (or ``ids``), at the benchmark's own
    paths, and a mask with the same code beside it when ``masks``. Returns (and extends) id -> code."""
    codes = {} if codes is None else codes
    for image_id in (bench.split_images(split) if ids is None else ids):
        code = codes.setdefault(image_id, len(codes) + 1)
        write_placeholder(bench.image_path(image_id), code)
        if masks:
            write_placeholder(bench.mask_path(image_id), code)
    return codes


class CodePreprocess:
    """A stand-in for the model's ``Preprocess``: 8x8 nearest resize, raw 0..255 values, masks as 3 channels."""

    image_size = SIZE

    def _t(self, img) -> torch.Tensor:
        from PIL import Image

        img = img.convert("RGB").resize((SIZE, SIZE), Image.NEAREST)
        return torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)

    def image(self, img, train: bool = False) -> torch.Tensor:
        return self._t(img)

    def mask(self, mask, train: bool = False) -> torch.Tensor:
        return self._t(mask)

    def pair(self, img, mask, train: bool = False):
        return self._t(img), (None if mask is None else self._t(mask))


#: the side of the square maps of the release's segmentation download (CLIPSeg's input size)
RELEASE_MAP_SIZE = 352


def write_release_maps(bench, split: str, size: tuple[int, int] = (48, 24)) -> dict[str, tuple[int, int]]:
    """Non-square images (``size``: width x height) at the benchmark's own paths for every image ``split``'s
    protocol needs, and at its mask paths (the release's names) each one's mask as the release's segmentation
    download holds it: CLIPSeg's map at its input size, 352x352, of the image squashed to that square.

    Each image is black with a white vertical band of its own inside the image's centre square (what a centre crop
    keeps); its map is white where the squashed band is. Returns id -> (first, last + 1) column of the band."""
    from PIL import Image

    w, h = size
    lo = (w - min(w, h)) // 2
    bands = {}
    for i, image_id in enumerate(bench.split_images(split)):
        left = lo + 2 + (i % 4) * 3
        band = np.zeros((h, w), dtype=np.uint8)
        band[:, left:left + 6] = 255
        bands[image_id] = (left, left + 6)
        for path, img in ((bench.image_path(image_id), Image.fromarray(band).convert("RGB")),
                          (bench.mask_path(image_id),
                           Image.fromarray(band).resize((RELEASE_MAP_SIZE, RELEASE_MAP_SIZE), Image.NEAREST))):
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, **({"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}))
    return bands
