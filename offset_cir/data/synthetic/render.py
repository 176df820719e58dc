"""Rendering: one cluttered scene's pixels and its dominant object's soft mask, and mask noise (docs/model.md#data).

A scene is a random textured background, 3 to 8 small *clutter* objects and, on top, the *dominant object*
whose shape, colour, size and pattern are given; everything else (position, rotation, clutter, background) is
drawn from the seed. Objects are anti-aliased by supersampling. :func:`degrade_mask` mimics an imperfect
segmenter (``--mask-noise``). Pure functions of their arguments: no files.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np

from offset_cir.data.synthetic.vocab import COLOURS, SHAPES, SIZES

CLUTTER_RANGE = (3, 8)
CLUTTER_DIAMETER = (0.08, 0.18)


# --------------------------------------------------------------------------------------------------- shapes
def _circle_points(n: int, radius: float = 1.0, start: float = 0.0, stop: float = 2 * math.pi,
                   centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    t = np.linspace(start, stop, n, endpoint=False if stop - start >= 2 * math.pi else True)
    return np.stack([centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)], axis=1)


def _regular(n: int, phase: float) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.5) -> np.ndarray:
    t = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _cross(half_width: float = 0.33) -> np.ndarray:
    # a plus sign whose arm tips touch the unit circle
    w = half_width
    e = math.sqrt(1.0 - w * w)
    return np.array([(w, -e), (w, -w), (e, -w), (e, w), (w, w), (w, e),
                     (-w, e), (-w, w), (-e, w), (-e, -w), (-w, -w), (-w, -e)], dtype=float)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.sqrt((pts ** 2).sum(1)).max()


def _crescent(d: float = 0.45, r: float = 0.8) -> np.ndarray:
    # unit disc minus a disc of radius r centred at (d, 0)
    xi = (1 - r * r + d * d) / (2 * d)
    yi = math.sqrt(1 - xi * xi)
    a_out = math.atan2(yi, xi)
    a_in = math.atan2(yi, xi - d)
    outer = _circle_points(40, 1.0, a_out, 2 * math.pi - a_out)
    inner = _circle_points(32, r, 2 * math.pi - a_in, a_in, centre=(d, 0.0))
    return np.concatenate([outer, inner], axis=0)


def _arrow() -> np.ndarray:
    return np.array([(-1.0, -0.3), (0.1, -0.3), (0.1, -0.75), (1.0, 0.0),
                     (0.1, 0.75), (0.1, 0.3), (-1.0, 0.3)], dtype=float) / math.hypot(1.0, 0.3)


_POLYGONS: dict[str, np.ndarray] = {}


def shape_polygon(shape: str) -> np.ndarray:
    """Outline of ``shape`` as an (N, 2) array inside the unit circle (touching it)."""
    if not _POLYGONS:
        _POLYGONS.update({
            "circle": _circle_points(48),
            "square": _regular(4, math.pi / 4),
            "triangle": _regular(3, -math.pi / 2),
            "star": _star(),
            "cross": _cross(),
            "heart": _heart(),
            "crescent": _crescent(),
            "arrow": _arrow(),
        })
    return _POLYGONS[shape]


# ------------------------------------------------------------------------------------------------ rendering
def _supersampling(image_size: int) -> int:
    return 4 if image_size <= 256 else 2


def _raster(shape: str, cx: float, cy: float, radius: float, angle: float, size: int, ss: int):
    """Anti-aliasing raster of one object: its box (x0, y0, x1, y1) in image pixels and the supersampled
    coverage (an 8-bit PIL image of the box's size times ``ss``), or None when the object falls outside."""
    from PIL import Image, ImageDraw

    x0 = max(0, int(math.floor(cx - radius)) - 1)
    y0 = max(0, int(math.floor(cy - radius)) - 1)
    x1 = min(size, int(math.ceil(cx + radius)) + 1)
    y1 = min(size, int(math.ceil(cy + radius)) + 1)
    if x1 <= x0 or y1 <= y0:
        return None
    c, s = math.cos(angle), math.sin(angle)
    pts = shape_polygon(shape)
    px = (pts[:, 0] * c - pts[:, 1] * s) * radius + cx
    py = (pts[:, 0] * s + pts[:, 1] * c) * radius + cy
    # pixel (i, j) of the supersampled box covers [x0 + i/ss, x0 + (i+1)/ss); PIL fills pixel centres
    qx = (px - x0) * ss - 0.5
    qy = (py - y0) * ss - 0.5
    canvas = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    ImageDraw.Draw(canvas).polygon(list(zip(qx.tolist(), qy.tolist())), fill=255)
    return (x0, y0, x1, y1), canvas


def _downsample(a: np.ndarray, ss: int) -> np.ndarray:
    h, w = a.shape[0] // ss, a.shape[1] // ss
    return a.reshape(h, ss, w, ss, *a.shape[2:]).mean(axis=(1, 3))


def _secondary(rgb: np.ndarray) -> np.ndarray:
    """Pattern colour: a darker shade of a light colour, a lighter one of a dark colour."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if lum > 0.45:
        return rgb * 0.4
    return rgb + (1.0 - rgb) * 0.6


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random textured background: a muted base colour, smooth blotches and one texture."""
    from PIL import Image

    h = rng.uniform(0, 1)
    s = rng.uniform(0.0, 0.25)
    v = rng.uniform(0.35, 0.70)
    base = np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)
    g = int(rng.integers(2, 7))
    coarse = rng.normal(0.0, rng.uniform(0.04, 0.12), size=(3, g, g)).astype(np.float32)
    smooth = np.stack([np.asarray(Image.fromarray(c, mode="F").resize((size, size), Image.BILINEAR))
                       for c in coarse], axis=-1)
    img = base[None, None, :] + smooth
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = int(rng.integers(0, 4))
    amp = rng.uniform(0.04, 0.12)
    if kind == 0:  # grain
        img = img + rng.normal(0.0, amp * 0.6, size=(size, size, 1)).astype(np.float32)
    elif kind == 1:  # stripes at a random angle
        a = rng.uniform(0, math.pi)
        period = rng.uniform(0.08, 0.3) * size
        wave = np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period)
        img = img + (amp * wave)[..., None]
    elif kind == 2:  # checker
        cell = rng.uniform(0.06, 0.2) * size
        chk = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2) * 2 - 1
        img = img + (amp * 0.7 * chk)[..., None]
    else:  # blotches of a second muted colour
        other = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.3), rng.uniform(0.35, 0.7)),
                         dtype=np.float32)
        field = rng.normal(0, 1, size=(int(rng.integers(3, 9)),) * 2).astype(np.float32)
        field = np.asarray(Image.fromarray(field, mode="F").resize((size, size), Image.BICUBIC))
        w = np.clip(field * 0.8 + 0.5, 0, 1)[..., None]
        img = img * (1 - w) + (other[None, None, :] + smooth) * w
    return np.clip(img, 0.0, 1.0)


def _composite(img: np.ndarray, box, canvas, colour: np.ndarray, ss: int,
               pattern_on: np.ndarray | None = None, secondary: np.ndarray | None = None) -> np.ndarray:
    """Alpha-composite one object onto ``img`` in place; returns its coverage at image resolution.

    ``pattern_on`` (supersampled, bool) marks where the object shows its ``secondary`` colour."""
    x0, y0, x1, y1 = box
    alpha = np.asarray(canvas.reduce(ss), dtype=np.float32) * np.float32(1 / 255)  # box filter, in C
    premult = alpha[..., None] * colour[None, None, :]
    if pattern_on is not None:
        cov = np.asarray(canvas, dtype=np.float32) * np.float32(1 / 255)
        frac = _downsample(cov * pattern_on, ss)  # coverage of the secondary colour per pixel
        premult += frac[..., None] * (secondary - colour)[None, None, :]
    region = img[y0:y1, x0:x1]
    img[y0:y1, x0:x1] = region * (1.0 - alpha[..., None]) + premult
    return alpha


def render_image(attrs: dict, image_size: int, seed) -> tuple[np.ndarray, np.ndarray, dict]:
    """Render one scene: (RGB uint8 HxWx3, dominant-object coverage float32 HxW in [0, 1], geometry).

    ``attrs`` holds the dominant object's shape, colour, size and pattern; ``seed`` fixes everything else.
    """
    rng = np.random.default_rng(seed)
    S = image_size
    ss = _supersampling(S)
    img = _background(rng, S)

    # clutter first: the dominant object lies on top, so its coverage is its whole mask
    for _ in range(int(rng.integers(CLUTTER_RANGE[0], CLUTTER_RANGE[1] + 1))):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = np.array(COLOURS[list(COLOURS)[int(rng.integers(len(COLOURS)))]], np.float32) / 255.0
        colour = np.clip(colour + rng.normal(0, 0.03, 3).astype(np.float32), 0, 1)
        r = rng.uniform(*CLUTTER_DIAMETER) * S / 2
        cx, cy = rng.uniform(-0.05, 1.05, size=2) * S
        ang = rng.uniform(0, 2 * math.pi)
        out = _raster(shape, cx, cy, r, ang, S, ss)
        if out is not None:
            _composite(img, out[0], out[1], colour, ss)

    r = SIZES[attrs["size"]] * S / 2 * rng.uniform(0.95, 1.05)
    margin = 1.0
    cx = rng.uniform(r + margin, S - r - margin)
    cy = rng.uniform(r + margin, S - r - margin)
    ang = rng.uniform(0, 2 * math.pi)
    primary = np.array(COLOURS[attrs["colour"]], np.float32) / 255.0
    primary = np.clip(primary + rng.normal(0, 0.025, 3).astype(np.float32), 0, 1)
    box, canvas = _raster(attrs["shape"], cx, cy, r, ang, S, ss)
    on = None
    if attrs["pattern"] != "solid":
        x0, y0, x1, y1 = box
        dy = y0 + (np.arange(canvas.height, dtype=np.float32) + 0.5) / ss - np.float32(cy)
        dx = x0 + (np.arange(canvas.width, dtype=np.float32) + 0.5) / ss - np.float32(cx)
        c, s = np.float32(math.cos(ang)), np.float32(math.sin(ang))
        period = np.float32(max(4.0, 2 * r / 4.5))
        u = (dx[None, :] * c + dy[:, None] * s) / period
        if attrs["pattern"] == "striped":
            on = np.mod(u, np.float32(1.0)) < 0.5
        else:  # dotted: a grid of dots turning with the object, one at its centre
            v = (dy[:, None] * c - dx[None, :] * s) / period
            pu = np.mod(u + np.float32(0.5), np.float32(1.0)) - np.float32(0.5)
            pv = np.mod(v + np.float32(0.5), np.float32(1.0)) - np.float32(0.5)
            on = pu * pu + pv * pv < np.float32(0.09)  # dot radius 0.3 period
    alpha = _composite(img, box, canvas, primary, ss, on, _secondary(primary))
    mask = np.zeros((S, S), np.float32)
    mask[box[1]:box[3], box[0]:box[2]] = alpha
    rgb = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    geometry = {"center": [round(float(cx), 3), round(float(cy), 3)], "radius": round(float(r), 3),
                "angle": round(math.degrees(ang) % 360.0, 3)}
    return rgb, mask, geometry


def degrade_mask(mask: np.ndarray, noise: float, radius: float, seed) -> np.ndarray:
    """Mimic an imperfect segmenter (``--mask-noise``): erode or dilate, shift, add and cut soft blobs, blur.

    ``mask`` is float in [0, 1]; ``noise`` in [0, 1] scales every effect (0 returns the mask unchanged);
    ``radius`` is the dominant object's radius in pixels.
    """
    from PIL import Image, ImageFilter

    if noise <= 0:
        return mask
    rng = np.random.default_rng(seed)
    S = mask.shape[0]
    m = mask
    k = int(round(rng.uniform(0.3, 1.0) * noise * 0.3 * radius))
    if k > 0:
        pil = Image.fromarray(np.rint(m * 255).astype(np.uint8), mode="L")
        filt = ImageFilter.MinFilter if rng.random() < 0.5 else ImageFilter.MaxFilter
        m = np.asarray(pil.filter(filt(2 * k + 1)), dtype=np.float32) / 255.0
    shift = np.rint(rng.normal(0, noise * 0.08 * radius, size=2)).astype(int)
    if shift.any():
        out = np.zeros_like(m)
        sy, sx = int(shift[0]), int(shift[1])
        src = m[max(0, -sy):S - max(0, sy), max(0, -sx):S - max(0, sx)]
        out[max(0, sy):max(0, sy) + src.shape[0], max(0, sx):max(0, sx) + src.shape[1]] = src
        m = out
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    ys, xs = np.nonzero(mask > 0.5)
    cy, cx = (float(ys.mean()), float(xs.mean())) if len(ys) else (S / 2, S / 2)
    for _ in range(int(rng.poisson(4 * noise))):
        if rng.random() < 0.5:  # near the object: holes and bulges
            by, bx = cy + rng.normal(0, radius), cx + rng.normal(0, radius)
        else:  # anywhere: false positives on the clutter or the background
            by, bx = rng.uniform(0, S, size=2)
        sigma = rng.uniform(0.1, 0.35) * radius + 1.0
        blob = np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * sigma ** 2))
        sign = 1.0 if rng.random() < 0.6 else -1.0
        m = m + sign * rng.uniform(0.4, 1.0) * blob
    m = np.clip(m, 0.0, 1.0)
    blur = noise * 1.2
    if blur > 0.1:
        pil = Image.fromarray(np.rint(m * 255).astype(np.uint8), mode="L")
        m = np.asarray(pil.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32) / 255.0
    return m

