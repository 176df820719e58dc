"""The table of benchmarks: ``register_dataset``, ``list_datasets``, ``dataset_class`` and ``get_dataset``.

One table maps a dataset name to its loader class, given either as the class or as ``"module:Class"`` (imported
on first use, so listing the names or loading one benchmark imports no other loader, and ``offset synth`` never
imports torch). The package's own benchmarks are registered here; another loader registers itself with the
decorator form, as timm's models do::

    @register_dataset("mybench")
    class MyBench(Benchmark): ...

Names are matched without case, ``-`` or ``_`` (``fashion-iq`` finds ``fashioniq``).
"""
from __future__ import annotations

import importlib

from offset_cir.errors import DatasetError

#: the table: key (the name without case, "-" or "_") -> (the name as registered, loader class or "module:Class")
DATASETS: dict[str, tuple[str, object]] = {}


def _key(name: str) -> str:
    return str(name).lower().replace("-", "").replace("_", "")


def register_dataset(name: str, loader=None):
    """Add the loader ``loader`` (a Benchmark subclass or ``"module:Class"``) under ``name``; without ``loader``,
    a class decorator doing the same. A name already taken by another loader is refused."""

    def add(target):
        key = _key(name)
        if key in DATASETS and _resolve_spec(DATASETS[key][1]) is not _resolve_spec(target):
            raise ValueError(f"dataset name {name!r} is already registered to {DATASETS[key][1]!r}")
        DATASETS[key] = (name, target)
        return target

    return add if loader is None else add(loader)


def _resolve_spec(target):
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def list_datasets() -> list[str]:
    """Every registered dataset name, in registration order."""
    return [name for name, _ in DATASETS.values()]


def dataset_class(name: str):
    """The loader class registered under ``name`` (imported now when registered by its path)."""
    key = _key(name)
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(list_datasets())}")
    registered, target = DATASETS[key]
    if isinstance(target, str):
        target = _resolve_spec(target)
        DATASETS[key] = (registered, target)
    return target


def get_dataset(name: str, root, **settings):
    """The benchmark ``name`` at ``root``; ``settings`` are the loader's keyword arguments (locations of
    annotations, images and masks, ``categories`` for FashionIQ, ``use_masks``, ...; see each module)."""
    klass = dataset_class(name)
    try:
        return klass(root, **settings)
    except TypeError as exc:
        raise DatasetError(f"{name}: bad setting ({exc})") from None


for _name, _spec in (("fashioniq", "offset_cir.data.fashioniq:FashionIQ"), ("shoes", "offset_cir.data.shoes:Shoes"),
                     ("cirr", "offset_cir.data.cirr:CIRR"), ("fashion200k", "offset_cir.data.fashion200k:Fashion200K"),
                     ("circo", "offset_cir.data.circo:CIRCO"),
                     ("synthetic", "offset_cir.data.synthetic.benchmark:Synthetic")):
    register_dataset(_name, _spec)
