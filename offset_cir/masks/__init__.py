"""Dominant portion segmentation: a captioner + CLIPSeg turn images into OFFSET masks (docs/model.md#masks and #data).

Public API (imported lazily: ``import offset_cir.masks`` loads neither torch nor transformers and does no I/O)::

    from offset_cir.masks import MaskGenerator
    gen = MaskGenerator(captioner="Salesforce/blip2-opt-2.7b", segmenter="CIDAS/clipseg-rd64-refined",
                        geometry="letterbox", device="cuda", batch_size=16)
    masks = gen(pil_images)                      # list of mode-"L" images, each the size of its input
    masks = gen(pil_images, captions=["a red dress", ...])   # no captioner is built

Folders and benchmarks: :func:`find_images`, :func:`get_layout` / :func:`mask_path_for`, :func:`plan`,
:func:`run_masks` (what ``offset masks`` runs).  Offline CLIP tokenizer: :func:`build_clip_tokenizer`.
"""
from __future__ import annotations

from offset_cir._lazy import lazy_getattr

_LAZY = {
    "MaskGenerator": "offset_cir.masks.generator",
    "HFCaptioner": "offset_cir.masks.models",
    "CLIPSegSegmenter": "offset_cir.masks.models",
    "Captioner": "offset_cir.masks.models",
    "Segmenter": "offset_cir.masks.models",
    "DEFAULT_CAPTIONER": "offset_cir.masks.models",
    "DEFAULT_SEGMENTER": "offset_cir.masks.models",
    "GEOMETRIES": "offset_cir.masks.geometry",
    "MaskLayout": "offset_cir.masks.layout",
    "LAYOUTS": "offset_cir.masks.layout",
    "DATASETS": "offset_cir.masks.layout",
    "get_layout": "offset_cir.masks.layout",
    "mask_path_for": "offset_cir.masks.layout",
    "find_images": "offset_cir.masks.layout",
    "MaskJob": "offset_cir.masks.pipeline",
    "MaskReport": "offset_cir.masks.records",
    "plan": "offset_cir.masks.pipeline",
    "run_masks": "offset_cir.masks.pipeline",
    "read_captions": "offset_cir.masks.records",
    "mask_is_valid": "offset_cir.masks.pipeline",
    "CAPTIONS_FILE": "offset_cir.masks.pipeline",
    "build_clip_tokenizer": "offset_cir.masks.tokenizer",
    "write_clip_tokenizer_files": "offset_cir.masks.tokenizer",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
