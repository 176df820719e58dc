"""Benchmarks (SPEC section 6): ``get_dataset(name, root, **settings)`` and ``collate``.

Names: ``fashioniq``, ``shoes``, ``cirr``, ``fashion200k`` and ``synthetic`` (the CIRR loader reading the
synthetic benchmark written by ``offset synth``). A benchmark reads its annotation files on first use and
images only when a Dataset item is requested.
"""
from __future__ import annotations

import importlib

from offset_cir.errors import DatasetError

DATASETS: dict[str, tuple[str, str]] = {
    "fashioniq": ("offset_cir.data.fashioniq", "FashionIQ"),
    "shoes": ("offset_cir.data.shoes", "Shoes"),
    "cirr": ("offset_cir.data.cirr", "CIRR"),
    "fashion200k": ("offset_cir.data.fashion200k", "Fashion200K"),
    "synthetic": ("offset_cir.data.cirr", "Synthetic"),
}


def get_dataset(name: str, root, **settings):
    """The benchmark ``name`` at ``root``; ``settings`` are the loader's keyword arguments (locations of
    annotations, images and masks, ``categories`` for FashionIQ, ``use_masks``, ...; see each module)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    module, cls = DATASETS[key]
    klass = getattr(importlib.import_module(module), cls)
    try:
        return klass(root, **settings)
    except TypeError as exc:
        raise DatasetError(f"{name}: bad setting ({exc})") from None


__all__ = ["DATASETS", "get_dataset", "collate", "normalize_caption"]


def __getattr__(name: str):
    # Imported on first use: `offset synth` (PIL + numpy only) then never imports torch.
    if name in ("collate", "normalize_caption"):
        from offset_cir.data import common

        return getattr(common, name)
    raise AttributeError(f"module 'offset_cir.data' has no attribute {name!r}")
