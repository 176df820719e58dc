"""Lazy package attributes: a package's public names imported from their modules on first use (PEP 562)."""
from __future__ import annotations

import importlib


def lazy_getattr(package: str, table: dict[str, str], namespace: dict):
    """A module ``__getattr__`` for ``package``: ``name`` in ``table`` is imported from ``table[name]`` when first
    asked for and cached in the package's ``namespace`` (its ``globals()``); other names raise AttributeError."""

    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
