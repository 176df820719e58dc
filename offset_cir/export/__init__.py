"""ONNX export of a trained OFFSET model and an onnxruntime encoder with the model's encode interface.

``export_onnx(model, out_dir)`` writes ``query.onnx``, ``target.onnx`` and ``export.json`` (see
``offset_cir.export.onnx``); ``OnnxEncoder(out_dir)`` runs them with onnxruntime and offers ``encode_query`` /
``encode_target`` / ``preprocess`` like :class:`offset_cir.model.offset.OFFSET`, so the search index and the
service take either (``offset_cir.export.runtime``). Nothing is imported until used.
"""
from __future__ import annotations

from offset_cir._lazy import lazy_getattr

_LAZY = {
    "export_onnx": "offset_cir.export.onnx",
    "export_checkpoint": "offset_cir.export.onnx",
    "ExportReport": "offset_cir.export.onnx",
    "EXPORT_NAME": "offset_cir.export.onnx",
    "OnnxEncoder": "offset_cir.export.runtime",
    "load_encoder": "offset_cir.export.runtime",
    "RUNTIMES": "offset_cir.export.runtime",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
