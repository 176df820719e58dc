"""Search your own images with a trained OFFSET model: gallery index, exact / FAISS search, REST service, web page.

``Index.open(path).search(image, text, k)`` returns ranked ``Hit(id, path, score)`` (``offset_cir.search.index``);
``build_index`` creates or updates an index folder (``offset_cir.search.build``: ``IndexBuilder``), whose files
``offset_cir.search.format`` reads and writes. The service lives in ``offset_cir.search.service`` (FastAPI,
imported only when used). A checkpoint's identity is ``offset_cir.model.checkpoint.checkpoint_hash`` (the
manifest stores it as ``sha256:<hex>``).
"""
from __future__ import annotations

from offset_cir.masks.layout import scan_images
from offset_cir.search.build import BuildReport, IndexBuilder, build_index
from offset_cir.search.index import Hit, Index, MaskRequiredError

__all__ = ["BuildReport", "Hit", "Index", "IndexBuilder", "MaskRequiredError", "build_index", "scan_images"]
