"""Synthetic cluttered-scene benchmark in the CIRR layout (issue 4 section 2; SPEC sections 6 and 7).

Each image holds one *dominant object* (shape, colour, size, pattern; random position and rotation) over a
random textured background with 3 to 8 smaller *clutter* objects drawn from the same shapes and colours, so
the paper's premise (a dominant portion plus noise, SPEC section 1) holds by construction. A triplet's target
changes 1 to 3 of the dominant object's attributes; background and clutter are drawn anew. The dominant
object's soft mask is written beside each image as ``<name>-segmask.png`` (SPEC section 6, CIRR row).

Files (``root`` = output folder)::

    image_splits/split.rc2.<split>.json   name -> "./<split>/<name>.png"
    captions/cap.rc2.<split>.json         CIRR records (pairid, reference, target_hard, target_soft, caption, img_set)
    <split>/<name>.png, <split>/<name>-segmask.png
    synthetic_meta.json                   written last: a folder without it is an interrupted run

Splits are ``train``, ``val`` and ``test``; all have targets. In val and test every query has its own set of
6 images built around its target (reference, target, one image per attribute that differs from the target in
that attribute only), so R_subset measures fine distinctions. Train sets are shared by up to three queries
(as CIRR train sets are) to render fewer images; training does not use them.

Some (shape, colour) pairs are *held out*: no dominant object of the train split has one; a fraction of the
val and test queries have a held-out target (``unseen_pairids``). Everything is a pure function of the seed
(byte-identical files).
"""
from __future__ import annotations

import colorsys
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from offset_cir.errors import DatasetError, UserInputError

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
META_NAME = "synthetic_meta.json"
PARTIAL_MARKER = ".offset-synth-partial"
SPLITS = ("train", "val", "test")

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "crescent", "arrow")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 30),
    "green": (35, 165, 60),
    "cyan": (40, 200, 215),
    "blue": (35, 75, 215),
    "purple": (135, 55, 190),
    "pink": (245, 125, 195),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# diameter of the dominant object's circumscribed circle as a fraction of the image side
SIZES: dict[str, float] = {"small": 0.36, "medium": 0.50, "large": 0.66}
PATTERNS = ("solid", "striped", "dotted")
ATTRIBUTES = ("shape", "colour", "size", "pattern")
VOCAB: dict[str, list[str]] = {
    "shape": list(SHAPES),
    "colour": list(COLOURS),
    "size": list(SIZES),
    "pattern": list(PATTERNS),
}

DEFAULTS = {
    "seed": 0,
    "image_size": 64,
    "n_train": 3000,
    "n_val": 300,
    "n_test": 500,
    "mask_noise": 0.0,
    "unseen_fraction": 0.25,
    "train_queries_per_set": 3,
}
# probability of a target changing 1, 2 or 3 attributes
N_CHANGES_P = (0.45, 0.35, 0.20)
CLUTTER_RANGE = (3, 8)
CLUTTER_DIAMETER = (0.08, 0.18)

_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


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


# --------------------------------------------------------------------------------------------------- text
def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


_SIZE_RELATIVE = {
    ("small", "medium"): "a bit bigger", ("medium", "large"): "bigger", ("small", "large"): "much bigger",
    ("medium", "small"): "smaller", ("large", "medium"): "a bit smaller", ("large", "small"): "much smaller",
}
_PATTERN_NOUN = {"striped": "stripes", "dotted": "dots", "solid": "plain fill"}
_PATTERN_ADJ = {"striped": "striped", "dotted": "dotted", "solid": "plain"}


def _change_phrases(attr: str, old: str, new: str) -> list[str]:
    if attr == "colour":
        return [f"make it {new}", f"change the colour to {new}", f"in {new} instead", f"{new} instead of {old}",
                f"turn it {new}", f"recolour it {new}", f"colour it {new}", f"it should be {new}"]
    if attr == "shape":
        return [f"make it {_an(new)}", f"change the shape to {_an(new)}", f"{_an(new)} instead of {_an(old)}",
                f"turn it into {_an(new)}", f"replace the {old} with {_an(new)}", f"use {_an(new)} shape",
                f"{new} shaped instead"]
    if attr == "size":
        rel = _SIZE_RELATIVE[(old, new)]
        return [f"make it {new}", f"change the size to {new}", f"{new} instead of {old}", f"resize it to {new}",
                f"make it {rel}", f"it should be {rel}", f"{rel} please"]
    if attr == "pattern":
        if new == "solid":
            return ["make it plain", f"remove the {_PATTERN_NOUN[old]}", f"solid instead of {_PATTERN_ADJ[old]}",
                    "no pattern", "with a solid fill", "give it a plain fill"]
        phrases = [f"make it {new}", f"add {_PATTERN_NOUN[new]}", f"with {_PATTERN_NOUN[new]}",
                   f"{new} instead of {_PATTERN_ADJ[old]}", f"give it {_PATTERN_NOUN[new]}"]
        if new == "dotted":
            phrases.append("with polka dots")
        return phrases
    raise KeyError(attr)


def _keep_phrases(attr: str, value: str) -> list[str]:
    if attr == "colour":
        return [f"keep it {value}", "keep the colour", f"still {value}", "same colour"]
    if attr == "shape":
        return [f"keep the {value}", "same shape", f"still {_an(value)}"]
    if attr == "size":
        return ["keep the size", "same size", f"still {value}"]
    if attr == "pattern":
        return [f"keep it {_PATTERN_ADJ[value]}", "same pattern", "keep the pattern"]
    raise KeyError(attr)


def make_caption(rng: np.random.Generator, ref: dict, tgt: dict, keep_p: float = 0.35) -> tuple[str, list[str]]:
    """Modification text for reference -> target attributes: one phrase per changed attribute (random wording),
    sometimes one phrase naming an attribute that stays, in random order. Returns (caption, kept attributes)."""
    changed = [a for a in ATTRIBUTES if ref[a] != tgt[a]]
    if not changed:
        raise ValueError("reference and target have the same attributes")
    clauses = []
    for a in changed:
        opts = _change_phrases(a, ref[a], tgt[a])
        clauses.append(opts[int(rng.integers(len(opts)))])
    kept: list[str] = []
    same = [a for a in ATTRIBUTES if a not in changed]
    if same and rng.random() < keep_p:
        a = same[int(rng.integers(len(same)))]
        opts = _keep_phrases(a, ref[a])
        clauses.append(opts[int(rng.integers(len(opts)))])
        kept.append(a)
    order = rng.permutation(len(clauses))
    clauses = [clauses[i] for i in order]
    if len(clauses) == 1:
        text = clauses[0]
    else:
        style = int(rng.integers(3))
        if style == 0:
            text = ", ".join(clauses[:-1]) + " and " + clauses[-1]
        elif style == 1:
            text = ", ".join(clauses)
        else:
            text = "; ".join(clauses)
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.2:
        text += "."
    return text, kept


# ------------------------------------------------------------------------------------------------ planning
def _key(a: dict) -> tuple:
    return tuple(a[k] for k in ATTRIBUTES)


class _Planner:
    """Draws the attributes of every set member and the queries of one split (no rendering)."""

    def __init__(self, rng: np.random.Generator, heldout: set[tuple[str, str]]):
        self.rng = rng
        self.heldout = heldout

    def pick(self, values):
        return values[int(self.rng.integers(len(values)))]

    def is_heldout(self, a: dict) -> bool:
        return (a["shape"], a["colour"]) in self.heldout

    def sample(self, heldout: bool | None) -> dict:
        """Random attributes; ``heldout`` True/False forces the (shape, colour) pair in/out of the held-out set."""
        if heldout:
            shape, colour = sorted(self.heldout)[int(self.rng.integers(len(self.heldout)))]
            return {"shape": shape, "colour": colour, "size": self.pick(list(SIZES)),
                    "pattern": self.pick(PATTERNS)}
        for _ in range(1000):
            a = {k: self.pick(VOCAB[k]) for k in ATTRIBUTES}
            if heldout is None or not self.is_heldout(a):
                return a
        raise RuntimeError("could not draw attributes outside the held-out pairs")

    def changed(self, base: dict, n: int, ok, taken: set) -> dict:
        """``base`` with exactly ``n`` attributes changed, accepted by ``ok`` and not in ``taken``."""
        for _ in range(1000):
            attrs = [ATTRIBUTES[i] for i in self.rng.permutation(len(ATTRIBUTES))[:n]]
            new = dict(base)
            for a in attrs:
                new[a] = self.pick([v for v in VOCAB[a] if v != base[a]])
            if ok(new) and _key(new) not in taken:
                return new
        raise RuntimeError(f"could not change {n} attribute(s) of {base}")

    def n_changes(self) -> int:
        return int(self.rng.choice([1, 2, 3], p=N_CHANGES_P))

    def neighbour(self, centre: dict, attr_order: list[str], ok, taken: set) -> tuple[dict, str]:
        """An image one attribute away from ``centre``, trying the attributes in ``attr_order`` first."""
        for a in attr_order + list(ATTRIBUTES):
            values = [v for v in VOCAB[a] if v != centre[a]]
            for i in self.rng.permutation(len(values)):
                new = dict(centre)
                new[a] = values[i]
                if ok(new) and _key(new) not in taken:
                    return new, a
        raise RuntimeError(f"no free neighbour of {centre}")

    def plan_set(self, n_queries: int, train: bool, unseen: bool) -> tuple[list[dict], list[tuple[int, int]]]:
        """Members (6 attribute dicts) and queries (reference index, target index) of one image set.

        The first target is the set's centre; further targets and the filler members are its one-attribute
        neighbours, each on a different attribute where possible. With one query (val, test) the set is
        reference, target and four neighbours of the target.
        """
        if train:
            ok_member = ok_ref = (lambda a: not self.is_heldout(a))
        else:
            ok_member = (lambda a: True)
            ok_ref = (lambda a: not self.is_heldout(a)) if unseen else (lambda a: True)
        centre = self.sample(heldout=True if unseen else False)
        members = [centre]
        taken = {_key(centre)}
        order = [ATTRIBUTES[i] for i in self.rng.permutation(len(ATTRIBUTES))]
        targets = [0]
        for _ in range(n_queries - 1):
            # extra train targets must keep held-out pairs out of train; neighbours may not be held out
            t, used = self.neighbour(centre, order, lambda a: not self.is_heldout(a), taken)
            if used in order:
                order.remove(used)
            members.append(t)
            taken.add(_key(t))
            targets.append(len(members) - 1)
        queries = []
        for ti in targets:
            ref = self.changed(members[ti], self.n_changes(), ok_ref, taken)
            members.append(ref)
            taken.add(_key(ref))
            queries.append((len(members) - 1, ti))
        while len(members) < 6:
            n, used = self.neighbour(centre, order, ok_member, taken)
            if used in order:
                order.remove(used)
            members.append(n)
            taken.add(_key(n))
        return members, queries


def choose_heldout(seed: int, n_pairs: int | None = None) -> list[tuple[str, str]]:
    """Held-out (shape, colour) pairs: one per shape, each with a different colour (so every shape and every
    colour is still seen in train)."""
    rng = np.random.default_rng([seed, 3])
    n = len(SHAPES) if n_pairs is None else n_pairs
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    return sorted((shapes[i % len(shapes)], colours[i % len(colours)]) for i in range(n))


# -------------------------------------------------------------------------------------------------- writing
def _render_chunk(task: tuple) -> list[dict]:
    """Worker: render and write a list of images; returns their geometry (deterministic per image seed)."""
    from PIL import Image

    root, image_size, mask_noise, items = task
    out = []
    for rel, attrs, seed_words in items:
        rgb, mask, geo = render_image(attrs, image_size, list(seed_words) + [0])
        if mask_noise > 0:
            mask = degrade_mask(mask, mask_noise, geo["radius"], list(seed_words) + [1])
        path = Path(root) / rel
        Image.fromarray(rgb, mode="RGB").save(path, format="PNG", compress_level=1)
        m8 = np.clip(np.rint(mask * 255.0), 0, 255).astype(np.uint8)
        Image.fromarray(m8, mode="L").save(path.with_name(path.stem + "-segmask.png"), format="PNG",
                                           compress_level=1)
        out.append(geo)
    return out


def _write_json(path: Path, obj, indent: int | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _config(seed, image_size, n_train, n_val, n_test, mask_noise, unseen_fraction, train_queries_per_set) -> dict:
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "image_size": int(image_size),
            "n_queries": {"train": int(n_train), "val": int(n_val), "test": int(n_test)},
            "mask_noise": float(mask_noise), "unseen_fraction": float(unseen_fraction),
            "train_queries_per_set": int(train_queries_per_set)}


def _validate(seed, image_size, n_train, n_val, n_test, mask_noise, unseen_fraction, train_queries_per_set):
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserInputError(f"seed: expected a non-negative integer, got {seed!r}")
    if not isinstance(image_size, (int, np.integer)) or not 32 <= image_size <= 1024:
        raise UserInputError(f"image_size: expected an integer from 32 to 1024 pixels, got {image_size!r}")
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise UserInputError(f"{name}: expected a positive number of queries, got {n!r}")
    if not 0.0 <= float(mask_noise) <= 1.0:
        raise UserInputError(f"mask_noise: expected a value in [0, 1], got {mask_noise!r}")
    if not 0.0 <= float(unseen_fraction) <= 1.0:
        raise UserInputError(f"unseen_fraction: expected a value in [0, 1], got {unseen_fraction!r}")
    if train_queries_per_set not in (1, 2, 3):
        raise UserInputError(f"train_queries_per_set: expected 1, 2 or 3, got {train_queries_per_set!r}")


_OWNED = ("image_splits", "captions", *SPLITS, META_NAME, PARTIAL_MARKER)


def _summary(meta: dict, root: Path, reused: bool, seconds: float) -> dict:
    return {"root": str(root), "generator_version": meta["generator_version"], "seed": meta["seed"],
            "image_size": meta["image_size"], "mask_noise": meta["mask_noise"], "splits": meta["counts"],
            "heldout_pairs": meta["heldout_pairs"], "reused": reused, "seconds": round(seconds, 2)}


def _prepare_folder(root: Path, config: dict, overwrite: bool) -> dict | None:
    """Decide what to do with ``root``: the existing meta when it is an up-to-date benchmark (reuse it),
    else None after clearing the generator's own paths. Refuses foreign or differently made folders."""
    meta_path = root / META_NAME
    if root.exists() and not root.is_dir():
        raise UserInputError(f"{root}: expected a folder for the synthetic benchmark, found a file")
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
            same = isinstance(old, dict) and old.get("config") == config
        except (OSError, ValueError):
            old, same = None, False
        complete = same and all((root / "captions" / f"cap.rc2.{s}.json").is_file()
                                and (root / "image_splits" / f"split.rc2.{s}.json").is_file() for s in SPLITS)
        if complete and not overwrite:
            return old
        if not same and not overwrite:
            raise UserInputError(
                f"{root}: holds a synthetic benchmark made with other settings ({meta_path}); "
                "pass overwrite (--overwrite) to replace it or choose another folder")
    elif (root / PARTIAL_MARKER).exists():
        logger.warning("%s: an interrupted generation was found (no %s); generating again", root, META_NAME)
    elif root.exists() and any(root.iterdir()) and not overwrite:
        raise UserInputError(
            f"{root}: folder is not empty and holds no synthetic benchmark; pass overwrite (--overwrite) "
            "or choose an empty folder")
    for name in _OWNED:  # only what this generator writes; other files stay
        p = root / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    return None


def _plan(seed: int, counts: dict[str, int], unseen_fraction: float, train_queries_per_set: int,
          heldout: set[tuple[str, str]]) -> dict:
    """Attributes of every image, the CIRR records and the per-query metadata of all splits (no pixels).

    Pair ids and set ids run on across the splits; image names are ``syn_<split>_<index>``."""
    images: dict[str, dict] = {}
    plan = {"images": images, "records": {}, "queries": {}, "unseen": {}, "render": []}
    pairid = set_id = 0
    for split in SPLITS:
        code = _SPLIT_CODE[split]
        rng = np.random.default_rng([seed, 1, code])
        planner = _Planner(rng, heldout)
        n = counts[split]
        train = split == "train"
        per_set = train_queries_per_set if train else 1
        unseen_flags = np.zeros(n, dtype=bool)
        if not train:
            unseen_flags[rng.permutation(n)[:int(round(unseen_fraction * n))]] = True
        records, queries_meta, unseen = [], [], []
        q = img_index = 0
        while q < n:
            members, queries = planner.plan_set(min(per_set, n - q), train, bool(unseen_flags[q]))
            # members in a random order, named in that order
            perm = rng.permutation(len(members))
            pos = {int(old): new for new, old in enumerate(perm)}
            names = []
            for new in range(len(members)):
                attrs = members[int(perm[new])]
                name = f"syn_{split}_{img_index:06d}"
                plan["render"].append((f"{split}/{name}.png", attrs, (seed, 2, code, img_index)))
                images[name] = {"split": split, **attrs}
                names.append(name)
                img_index += 1
            for ri, ti in queries:
                ref, tgt = members[ri], members[ti]
                caption, kept = make_caption(rng, ref, tgt)
                rname, tname = names[pos[ri]], names[pos[ti]]
                records.append({
                    "pairid": pairid, "reference": rname, "target_hard": tname, "target_soft": {tname: 1.0},
                    "caption": caption,
                    "img_set": {"id": set_id, "members": list(names), "reference_rank": pos[ri],
                                "target_rank": pos[ti]},
                })
                target_unseen = (tgt["shape"], tgt["colour"]) in heldout
                queries_meta.append({
                    "pairid": pairid, "reference": rname, "target": tname,
                    "changes": {a: [ref[a], tgt[a]] for a in ATTRIBUTES if ref[a] != tgt[a]},
                    "kept": kept, "unseen": target_unseen})
                if target_unseen:
                    unseen.append(pairid)
                pairid += 1
                q += 1
            set_id += 1
        plan["records"][split], plan["queries"][split], plan["unseen"][split] = records, queries_meta, unseen
    return plan


def _render_all(root: Path, items: list, image_size: int, mask_noise: float, workers: int | None,
                progress: bool) -> list[dict]:
    """Render and write every image and mask (in ``workers`` spawned processes); geometry in item order."""
    from tqdm import tqdm

    chunk = 64
    tasks = [(str(root), image_size, float(mask_noise), items[i:i + chunk]) for i in range(0, len(items), chunk)]
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if len(items) >= 1000 else 1
    geos: list[dict] = []
    with tqdm(total=len(items), desc="synth images", unit="img", disable=not progress) as bar:
        if workers > 1:
            import multiprocessing as mp

            # fork where there is one: a spawned worker would re-import offset_cir.data and with it torch
            # (seconds and ~0.7 GB each); the workers use only numpy and PIL. Results are seed-determined.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method).Pool(workers) as pool:
                for res in pool.imap(_render_chunk, tasks):
                    geos.extend(res)
                    bar.update(len(res))
        else:
            for t in tasks:
                res = _render_chunk(t)
                geos.extend(res)
                bar.update(len(res))
    return geos


def generate(out_dir, seed: int = 0, image_size: int = 64, n_train: int = DEFAULTS["n_train"],
             n_val: int = DEFAULTS["n_val"], n_test: int = DEFAULTS["n_test"], mask_noise: float = 0.0,
             unseen_fraction: float = DEFAULTS["unseen_fraction"],
             train_queries_per_set: int = DEFAULTS["train_queries_per_set"], overwrite: bool = False,
             workers: int | None = None, progress: bool = True) -> dict:
    """Write the synthetic benchmark to ``out_dir`` in the CIRR layout (SPEC section 6) and return a summary
    (``root``, ``seed``, ``image_size``, ``mask_noise``, per-split counts under ``splits``, ``heldout_pairs``,
    ``reused``, ``seconds``).

    ``n_train``/``n_val``/``n_test`` count queries (triplets). An existing benchmark with the same settings is
    reused as is; one with other settings, or a folder with other files, is refused unless ``overwrite``
    (which deletes only the paths this generator writes). A folder left by an interrupted run (no
    ``synthetic_meta.json``) is regenerated. ``workers`` processes render images (default: up to 2).
    """
    _validate(seed, image_size, n_train, n_val, n_test, mask_noise, unseen_fraction, train_queries_per_set)
    t0 = time.perf_counter()
    root = Path(out_dir)
    config = _config(seed, image_size, n_train, n_val, n_test, mask_noise, unseen_fraction, train_queries_per_set)
    old = _prepare_folder(root, config, overwrite)
    if old is not None:
        logger.info("synthetic benchmark in %s is up to date; reusing it", root)
        return _summary(old, root, True, time.perf_counter() - t0)
    root.mkdir(parents=True, exist_ok=True)
    (root / PARTIAL_MARKER).write_text("generation in progress; synthetic_meta.json is written last\n")

    heldout = choose_heldout(seed)
    plan = _plan(seed, {"train": n_train, "val": n_val, "test": n_test}, unseen_fraction, train_queries_per_set,
                 set(heldout))
    for split in SPLITS:
        (root / split).mkdir(parents=True, exist_ok=True)
    geos = _render_all(root, plan["render"], image_size, mask_noise, workers, progress)
    images = plan["images"]
    for (rel, _, _), geo in zip(plan["render"], geos):
        images[Path(rel).stem].update(geo)

    (root / "image_splits").mkdir(exist_ok=True)
    (root / "captions").mkdir(exist_ok=True)
    split_counts = {}
    for split in SPLITS:
        names = [n for n, v in images.items() if v["split"] == split]
        records = plan["records"][split]
        _write_json(root / "image_splits" / f"split.rc2.{split}.json", {n: f"./{split}/{n}.png" for n in names},
                    indent=1)
        _write_json(root / "captions" / f"cap.rc2.{split}.json", records, indent=1)
        split_counts[split] = {"queries": len(records), "images": len(names),
                               "sets": len({r["img_set"]["id"] for r in records}),
                               "unseen_queries": len(plan["unseen"][split])}
    meta = {
        **config, "config": config, "counts": split_counts, "vocab": VOCAB,
        "heldout_pairs": [list(p) for p in heldout], "unseen_pairids": plan["unseen"],
        "queries": plan["queries"], "images": images,
    }
    _write_json(root / META_NAME, meta)  # last: its presence marks a complete benchmark
    (root / PARTIAL_MARKER).unlink()
    seconds = time.perf_counter() - t0
    logger.info("synthetic benchmark written to %s in %.1f s", root, seconds)
    return _summary(meta, root, False, seconds)


# -------------------------------------------------------------------------------------------------- reading
def load_meta(root) -> dict:
    """The benchmark's ``synthetic_meta.json`` (vocab, held-out pairs, per-image attributes and geometry,
    per-query changes); a clear error when it is absent (not a synthetic benchmark, or an interrupted run)."""
    path = Path(root) / META_NAME
    if not path.is_file():
        hint = ""
        if (Path(root) / PARTIAL_MARKER).exists():
            hint = " (an interrupted generation: run `offset synth` again)"
        raise DatasetError(f"{path}: not found; expected the synthetic benchmark's metadata{hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("images", "queries", "unseen_pairids", "heldout_pairs", "vocab"):
        if key not in meta:
            raise DatasetError(f"{path}: field '{key}' missing; expected a synthetic benchmark metadata file")
    return meta


def unseen_pairids(root, split: str) -> list[int]:
    """Pair ids of ``split`` whose target's (shape, colour) pair never appears in train (sorted)."""
    meta = load_meta(root)
    if split not in meta["unseen_pairids"]:
        raise DatasetError(f"{Path(root) / META_NAME}: no split '{split}'; expected one of "
                           f"{sorted(meta['unseen_pairids'])}")
    return sorted(int(p) for p in meta["unseen_pairids"][split])
