"""A person's own photo, generated (``make_photo``), and a stand-in for the mask pipeline (``BoxMaskGenerator``), for
the tests of the search page and API and for ``docs/screenshots.py``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_photo(path: Path, size: tuple[int, int] = (320, 240), seed: int = 0, fmt: str | None = None) -> Path:
    """A placeholder "photo" of ``size`` (w, h) at ``path``: a smooth two-colour background with a few filled
    shapes of random colours (no benchmark image, nothing downloaded)."""
    rng = np.random.default_rng(seed)
    w, h = size
    a, b = rng.integers(40, 220, size=(2, 3))
    t = np.linspace(0.0, 1.0, w)[None, :, None] * np.linspace(0.3, 1.0, h)[:, None, None]
    img = Image.fromarray((a * (1 - t) + b * t).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h * 3 // 4))
        x1, y1 = x0 + int(rng.integers(w // 8, w // 3)), y0 + int(rng.integers(h // 8, h // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


class BoxMaskGenerator:
    """Stands in for ``offset_cir.masks.MaskGenerator``: each image's mask marks the box ``fraction`` of its width
    and height around its centre (255 inside, 0 outside). ``calls`` counts the images it was given."""

    def __init__(self, fraction: float = 0.5):
        self.fraction = float(fraction)
        self.calls = 0

    def load(self) -> None:
        """Nothing to build (the service builds the real pipeline's models once, at start)."""

    def box(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """The box (x0, y0, x1, y1) it marks in an image of ``size``."""
        w, h = size
        bw, bh = max(1, round(w * self.fraction)), max(1, round(h * self.fraction))
        return (w - bw) // 2, (h - bh) // 2, (w - bw) // 2 + bw, (h - bh) // 2 + bh

    def __call__(self, images):
        out = []
        for im in images:
            self.calls += 1
            mask = Image.new("L", im.size, 0)
            mask.paste(255, self.box(im.size))
            out.append(mask)
        return out
