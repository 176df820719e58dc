"""Encoding gallery images into target features (the data package's ImageDataset), and making the masks they lack
with the mask pipeline."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from offset_cir import io
from offset_cir.search.inputs import load_pil, uses_target_mask

log = logging.getLogger(__name__)

#: images per call of the mask pipeline
MASK_BATCH = 16


def _collate(batch: list[dict]):
    """ImageDataset items -> (positions, images [B,3,H,W] or None, masks or None, [(position, error)])."""
    import torch

    ok = [b for b in batch if "error" not in b]
    bad = [(b["index"], b["error"]) for b in batch if "error" in b]
    rows = [b["index"] for b in ok]
    imgs = torch.stack([b["image"] for b in ok]) if ok else None
    has_masks = bool(ok) and ok[0]["mask"] is not None
    masks = torch.stack([b["mask"] for b in ok]) if has_masks else None
    return rows, imgs, masks, bad


def encode_gallery(model, items: list[dict], *, batch_size: int = 32, num_workers: int = 0, device=None,
                   use_masks: bool | None = None, dtype: str = "float16", progress=None):
    """Target features of ``items`` (dicts with ``id``, ``path`` and, when masks are used, ``mask``).

    Returns ``(features [M, D], rows_ok, errors)``: features for the readable items (in item order), their
    positions in ``items``, and ``{position: message}`` for the unreadable ones.
    """
    import torch
    from torch.utils.data import DataLoader

    from offset_cir.data.common import ImageDataset
    from offset_cir.device import device_of

    device = device or device_of(model)
    use_masks = uses_target_mask(model) if use_masks is None else use_masks
    ids = [str(it.get("id", r)) for r, it in enumerate(items)]  # what error messages name
    if len(set(ids)) != len(ids):
        ids = [str(r) for r in range(len(items))]
    images = {i: it["path"] for i, it in zip(ids, items)}
    masks = {i: it.get("mask") for i, it in zip(ids, items)}
    data = ImageDataset(ids, images.__getitem__, masks.__getitem__, model.preprocess, use_masks=use_masks,
                        source="gallery", report_unreadable=True)
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate, shuffle=False)
    feats = np.zeros((len(items), int(model.embed_dim)), dtype=dtype)
    ok = np.zeros(len(items), dtype=bool)
    errors: dict[int, str] = {}
    with torch.inference_mode():
        for rows, imgs, mask_t, bad in loader:
            for r, msg in bad:
                errors[r] = msg
            if rows:
                out = model.encode_target(imgs.to(device), mask_t.to(device) if mask_t is not None else None)
                feats[rows] = out.float().cpu().numpy().astype(dtype)
                ok[rows] = True
            if progress is not None:
                progress.update(len(rows) + len(bad))
    keep = np.flatnonzero(ok)
    return feats[keep], keep.tolist(), errors


def make_missing_masks(items: list[dict], mask_generator, folder: Path) -> None:
    """Give every item without a mask one made by ``mask_generator``, saved as ``folder/<id>-segmask.png``; the
    items' ``mask`` and ``mask_mtime_ns`` are filled in."""
    need = [it for it in items if it.get("mask") is None]
    for i in range(0, len(need), MASK_BATCH):
        part = need[i:i + MASK_BATCH]
        pils = [load_pil(it["path"]) for it in part]
        for it, m in zip(part, mask_generator(pils)):
            dst = Path(folder) / (it["id"] + "-segmask.png")
            dst.parent.mkdir(parents=True, exist_ok=True)
            with io.atomic_path(dst) as tmp:
                m.convert("L").save(tmp, format="PNG")
            it["mask"] = str(dst.resolve())
            it["mask_mtime_ns"] = dst.stat().st_mtime_ns
