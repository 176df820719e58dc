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

_TABLE: dict[str, object] = {}  # key -> loader class or "module:Class"
_NAMES: dict[str, str] = {}  # key -> the name as registered (what list_datasets shows)


def _key(name: str) -> str:
    return str(name).lower().replace("-", "").replace("_", "")


def register_dataset(name: str, loader=None):
    """Add the loader ``loader`` (a Benchmark subclass or ``"module:Class"``) under ``name``; without ``loader``,
    a class decorator doing the same. A name already taken by another loader is refused."""

    def add(target):
        key = _key(name)
        if key in _TABLE and _TABLE[key] is not target and _resolve_spec(_TABLE[key]) is not _resolve_spec(target):
            raise ValueError(f"dataset name {name!r} is already registered to {_TABLE[key]!r}")
        _TABLE[key], _NAMES[key] = target, name
        return target

    return add if loader is None else add(loader)


def _resolve_spec(target):
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def list_datasets() -> list[str]:
    """Every registered dataset name, in registration order."""
    return [_NAMES[k] for k in _TABLE]


def dataset_class(name: str):
    """The loader class registered under ``name`` (imported now when registered by its path)."""
    key = _key(name)
    if key not in _TABLE:
        raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(list_datasets())}")
    target = _TABLE[key]
    if isinstance(target, str):
        target = _TABLE[key] = _resolve_spec(target)
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
