"""Optional dependencies: import a module that one of the package's extras installs, or say which extra installs it.

The core install (model, data, evaluation, search index) needs none of them; ``pip install 'offset-cir[train]'``
adds TensorBoard and matplotlib for training (its logs and ``curves.png``) and the demo's figures.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from offset_cir.errors import UserInputError

__all__ = ["import_extra"]


def import_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``; when its distribution is missing, a ``UserInputError`` that says what
    needs it (``purpose``) and how to install it (``pip install 'offset-cir[<extra>]'``)."""
    top = module.split(".", 1)[0]
    try:
        importlib.import_module(top)
    except ImportError as exc:
        raise UserInputError(f"{purpose} needs {top}, which is not installed: pip install 'offset-cir[{extra}]'"
                             ) from exc
    return importlib.import_module(module)
