"""The scene vocabulary: an object's attributes (shape, colour, size, pattern) and the values each can take.

Shared by rendering (what to draw), captions (what to name) and planning (what to draw from); the values are also
written to ``synthetic_meta.json`` (``vocab``).
"""
from __future__ import annotations

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

