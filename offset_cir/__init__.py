"""offset-cir: OFFSET composed image retrieval (Chen et al., ACM MM 2025).

Public API (imported lazily so that ``import offset_cir`` is cheap and does no I/O)::

    from offset_cir import ModelConfig, build_model, save_checkpoint, load_checkpoint
    from offset_cir import convert_release_checkpoint, evaluate
"""
from __future__ import annotations

__version__ = "0.1.0"

from offset_cir._lazy import lazy_getattr

_LAZY = {
    "ModelConfig": "offset_cir.model.config",
    "ABLATIONS": "offset_cir.model.config",
    "build_model": "offset_cir.model.offset",
    "OFFSET": "offset_cir.model.offset",
    "save_checkpoint": "offset_cir.model.checkpoint",
    "load_checkpoint": "offset_cir.model.checkpoint",
    "convert_release_checkpoint": "offset_cir.model.release",
    "evaluate": "offset_cir.eval.evaluate",
}

__all__ = sorted(_LAZY) + ["__version__"]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
