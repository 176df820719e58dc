"""Benchmarks (docs/model.md#data): ``get_dataset(name, root, **settings)``, the table of benchmarks, and ``collate``.

Names (``list_datasets()``): ``fashioniq``, ``shoes``, ``cirr``, ``fashion200k``, ``circo`` and ``synthetic``
(the benchmark written by ``offset synth``, in CIRR's layout). The table and ``register_dataset`` live in
:mod:`offset_cir.data.registry`. A benchmark reads its annotation files on first use and images only when a
Dataset item is requested.
"""
from __future__ import annotations

from offset_cir.data.registry import dataset_class, get_dataset, list_datasets, register_dataset

__all__ = ["get_dataset", "list_datasets", "register_dataset", "dataset_class", "collate", "normalize_caption"]


def __getattr__(name: str):
    # Imported on first use: `offset synth` (PIL + numpy only) then never imports torch.
    if name in ("collate", "normalize_caption"):
        from offset_cir.data import common

        return getattr(common, name)
    raise AttributeError(f"module 'offset_cir.data' has no attribute {name!r}")
