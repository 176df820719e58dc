"""Search your own images with a trained OFFSET model: gallery index, exact / FAISS search, REST service, web page.

``Index.open(path).search(image, text, k)`` returns ranked ``Hit(id, path, score)``; ``build_index`` (also
``Index.build``) creates or updates an index folder. The service lives in ``offset_cir.search.service``
(FastAPI, imported only when used).
"""
from __future__ import annotations

from offset_cir.search.index import (
    BuildReport,
    Hit,
    Index,
    MaskRequiredError,
    build_index,
    checkpoint_hash,
    scan_images,
)

__all__ = ["BuildReport", "Hit", "Index", "MaskRequiredError", "build_index", "checkpoint_hash", "scan_images"]
