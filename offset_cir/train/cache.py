"""A disk cache of what a frozen backbone computes, so that later epochs (and the other runs) skip it.

With the backbone frozen (offset_cir.train.freeze), the frozen part of the image tower is a fixed function of the
preprocessed image; the cache stores its output once per image and per mask, and training, evaluation and index
building then run only the trainable rest. The same holds for a frozen Hugging Face text tower: its last hidden
state is stored per caption and only the new projection (and OFFSET) run live.

- Image tower (a timm CNN, OpenCLIP ``TimmModel``): with ``image_blocks=0`` the cached feature is the trunk's
  final feature map (``forward_features``); with ``image_blocks=N`` (EfficientNet family) it is the input of the
  last N blocks, which then train. Everything after it (those blocks, the pooled head, OpenCLIP's projection into
  D) runs live, exactly as ``Backbone.encode_image`` computes it.
- Keys: an image's key is the SHA-256 of its decoded content (mode, size and RGB pixel bytes) — the file's
  content, so a changed file is a new key and is encoded again, while a copy or a re-encoded identical image is
  found. A caption's key is the SHA-256 of its token ids. Entries live under a folder named by a fingerprint of
  everything else they depend on: backbone name, the split point, the weights of the frozen part, and the
  preprocessing (size, normalisation, the evaluation transform), so a changed backbone never reads stale entries.
- The cache serves the evaluation transform only (a random training crop has no fixed output): training with the
  cache trains without random crops.
- Files: ``<root>/<fingerprint>/<key[:2]>/<key>.safetensors``, renamed into place whole (not flushed to disk
  first: an entry that a power loss tore fails to load and is computed again); float32. The frozen part runs on
  a copy of its modules with the batch norms folded into the convolutions, in channels-last layout
  (offset_cir.train.tower_split; faster than the tower's own modules on CPUs: benchmarks/train_speed.py
  --cache-fill measures it); a cached feature equals the live one up to float32 rounding.
- The datasets' loaders ask ``CachedPreprocess.files`` first: a file this process has warmed, unchanged since,
  gives its feature without being decoded again.

``attach_cache(model, cache)`` makes ``model`` read through the cache (its ``preprocess`` yields cached features
and its backbone's ``encode_image`` / ``encode_text`` take them); ``detach_cache`` undoes it. Checkpoints of an
attached model are ordinary checkpoints.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable

import torch
from torch import nn

from offset_cir import io
from offset_cir.device import device_of
from offset_cir.errors import UserInputError
from offset_cir.train.tower_split import ImageSplit

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def _module_digest(modules: Iterable[nn.Module]) -> str:
    h = hashlib.sha256()
    for m in modules:
        for name, t in m.state_dict().items():
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# (path, mode, file size, mtime_ns) -> (content key, pixel size) of the files this process has decoded and hashed:
# a second warm-up of the same files (the demo's next run) and the datasets' loaders (``CachedPreprocess.files``)
# skip decoding them. A changed file has another size or mtime, so it is decoded and hashed again.
_FILE_KEYS: dict[tuple[str, str, int, int], tuple[str, tuple[int, int]]] = {}


def _file_id(path: Path, mode: str) -> tuple[str, str, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return str(path), mode, st.st_size, st.st_mtime_ns


def image_key(img) -> str:
    """SHA-256 of a decoded image's content as the model sees it (RGB): mode, size, pixel bytes."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    h = hashlib.sha256(f"{rgb.mode}:{rgb.size[0]}x{rgb.size[1]}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def tokens_key(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ storage
class _Store:
    """``key -> tensor`` files under one fingerprint folder, with a small in-memory layer."""

    def __init__(self, folder: Path, info: dict, memory_bytes: int = 1 << 30):
        self.folder, self.memory_bytes, self._held = folder, int(memory_bytes), 0
        folder.mkdir(parents=True, exist_ok=True)
        info_path = folder / "cache_info.json"
        if not info_path.is_file():
            io.write_text(info_path, json.dumps(info, indent=2))
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return key in self.memory or self._path(key).is_file()

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            self.hits += 1
            return self.memory[key]
        path = self._path(key)
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            value = load_file(str(path))["x"]
        except Exception as exc:  # a damaged entry is recomputed, not trusted
            log.warning("feature cache: unreadable entry %s (%s); recomputing it", path, exc)
            return None
        self.hits += 1
        self._remember(key, value)
        return value

    def _remember(self, key: str, value: torch.Tensor) -> None:
        """Keep entries in memory up to ``memory_bytes`` (then start over: the files stay)."""
        size = value.numel() * value.element_size()
        if self._held + size > self.memory_bytes:
            self.memory.clear()
            self._held = 0
        self.memory[key] = value
        self._held += size

    def put(self, key: str, value: torch.Tensor) -> None:
        from safetensors.torch import save

        value = value.detach().to("cpu", torch.float32).contiguous()
        path = self._path(key)
        # renamed into place whole, not flushed first (a flush per entry would dominate the fill: tens of thousands of entries): an entry is
        # derived data, and one torn by a power loss fails to load and is recomputed (get)
        data = save({"x": value})
        try:
            io.write_bytes(path, data, durable=False)
        except FileNotFoundError:  # the entry's <key[:2]> folder does not exist yet
            path.parent.mkdir(parents=True, exist_ok=True)
            io.write_bytes(path, data, durable=False)
        self._remember(key, value)
        self.misses += 1


class FeatureCache:
    """The frozen parts of ``model``'s backbone, stored on disk under ``root`` (see the module docstring).

    ``image_blocks``: the trainable last blocks of the image tower (they run live); ``cache_text``: store the
    frozen text tower's hidden states too (needs a Hugging Face text tower, all of it frozen).
    """

    def __init__(self, root: str | os.PathLike, model, image_blocks: int = 0, cache_text: bool = True,
                 batch_size: int = 64):
        self.root = Path(root)
        self.backbone = backbone = model.backbone
        self.preprocess = model.preprocess
        self.split = ImageSplit(backbone, image_blocks)
        self.batch_size = int(batch_size)
        for m in self.split.frozen_modules():
            if any(p.requires_grad for p in m.parameters()):
                raise UserInputError("feature cache: the cached part of the image tower must be frozen "
                                     "(freeze_backbone=true, and no more trainable image blocks than the cache runs live)")
        pre = self.preprocess
        common = {"version": CACHE_VERSION, "backbone": backbone.name, "image_size": pre.image_size,
                  "mean": list(pre.mean), "std": list(pre.std), "transform": "resize-shortest bicubic, centre crop"}
        image_info = {**common, "kind": "image", **self.split.describe(),
                      "weights": _module_digest(self.split.frozen_modules())}
        self.images = _Store(self.root / ("image-" + _fingerprint(image_info)), image_info)
        self.text = None
        if cache_text:
            if backbone.text_kind != "hf":
                raise UserInputError(f"feature cache: caching the text tower needs a Hugging Face text tower; "
                                     f"{backbone.name!r} has a {backbone.text_kind!r} one (set cache_text=False)")
            tower = backbone.clip.text.transformer
            if any(p.requires_grad for p in tower.parameters()):
                raise UserInputError("feature cache: the text tower is (partly) trainable; its features cannot be "
                                     "cached (trainable_text_blocks must be 0)")
            text_info = {"version": CACHE_VERSION, "backbone": backbone.name, "kind": "text",
                         "weights": _module_digest([tower])}
            self.text = _Store(self.root / ("text-" + _fingerprint(text_info)), text_info)

    # ------------------------------------------------------------------ images
    def _device(self) -> torch.device:
        return device_of(self.backbone)

    def _compute_images(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        with _eval_mode(self.split.visual), torch.no_grad():
            for i in range(0, len(tensors), self.batch_size):
                batch = torch.stack(tensors[i:i + self.batch_size]).to(self._device())
                out.extend(self.split.frozen(batch).float().cpu())
        return out

    def image_features(self, images: list) -> list[torch.Tensor]:
        """Cached features of PIL images (the evaluation transform), computing and storing the missing ones."""
        keys = [image_key(img) for img in images]
        found = [self.images.get(k) for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        if todo:
            computed = self._compute_images([self.preprocess.image(images[i], train=False) for i in todo])
            for i, feat in zip(todo, computed):
                self.images.put(keys[i], feat)
                found[i] = feat
        return found

    def warm(self, files: Iterable[tuple[Path, str]], progress: bool = False, desc: str = "feature cache") -> int:
        """Encode every ``(path, mode)`` not cached yet, in batches; returns how many were encoded. ``mode`` is how
        the datasets open the file: "RGB" for an image, "L" for a mask."""
        from offset_cir.data.common import open_image

        paths = list(dict.fromkeys((Path(p), mode) for p, mode in files))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(paths), desc=desc, unit="img", leave=False, dynamic_ncols=True)
        before = self.images.misses
        chunk = max(self.batch_size, 1) * 4
        for i in range(0, len(paths), chunk):
            part = paths[i:i + chunk]
            missing = []
            for p, mode in part:
                file_id = _file_id(p, mode)
                seen = _FILE_KEYS.get(file_id) if file_id else None
                if seen is not None and self.images.has(seen[0]):
                    continue  # this file, unchanged since this process hashed it, is cached
                img = open_image(p, mode, "image" if mode == "RGB" else "mask")
                key = image_key(img)
                if file_id is not None:
                    _FILE_KEYS[file_id] = (key, img.size)
                if not self.images.has(key):
                    missing.append(img)
            if missing:
                self.image_features(missing)
            if bar is not None:
                bar.update(len(part))
        if bar is not None:
            bar.close()
        return self.images.misses - before

    def file_feature(self, path, mode: str) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """(stored feature, pixel size) of a file this process has warmed, unchanged since (same byte size and
        modification time), without opening it; None for any other file (the caller decodes it)."""
        file_id = _file_id(Path(path), mode)
        seen = _FILE_KEYS.get(file_id) if file_id else None
        if seen is None:
            return None
        value = self.images.get(seen[0])
        return None if value is None else (value, seen[1])

    # -------------------------------------------------------------------- text
    def text_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The frozen text tower's last hidden state [B, L, C_t] for token ids [B, L], cached per caption."""
        keys = [tokens_key(row) for row in ids]
        found = [self.text.get(k) for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        if todo:
            tower = self.backbone.clip.text
            sub = ids[todo]
            attention = (sub != self.backbone.pad_token_id).long()
            with _eval_mode(tower.transformer), torch.no_grad():
                hidden = tower.transformer(input_ids=sub, attention_mask=attention).last_hidden_state
            for i, h in zip(todo, hidden.float().cpu()):
                self.text.put(keys[i], h)
                found[i] = h
        return torch.stack(found).to(ids.device)

    def stats(self) -> dict:
        out = {"image_hits": self.images.hits, "image_misses": self.images.misses}
        if self.text is not None:
            out.update(text_hits=self.text.hits, text_misses=self.text.misses)
        return out


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Evaluation mode inside, and every submodule's own mode back afterwards (``train(True)`` would also wake the
    batch norms and the modules that freezing holds in eval mode)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _fingerprint(info: dict) -> str:
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- attaching to a model
class CachedPreprocess:
    """Stands in for ``model.preprocess``: yields cached features instead of pixels (evaluation transform)."""

    def __init__(self, cache: FeatureCache, base):
        self.cache, self.base = cache, base
        self.image_size, self.mean, self.std = base.image_size, base.mean, base.std

    def image(self, img, train: bool = False) -> torch.Tensor:
        return self.cache.image_features([img])[0]

    def mask(self, mask, train: bool = False) -> torch.Tensor:
        return self.image(mask)

    def pair(self, img, mask, train: bool = False):
        if mask is None:
            return self.image(img), None
        a, b = self.cache.image_features([img, mask])
        return a, b

    def files(self, image_path, mask_path=None):
        """``((image feature, mask feature or None), (image size, mask size or None))`` read by file name when
        both files were warmed unchanged (``FeatureCache.file_feature``); None when either must be decoded.
        The datasets' loaders ask this first, so an epoch over warmed files decodes no image."""
        img = self.cache.file_feature(image_path, "RGB")
        if img is None:
            return None
        if mask_path is None:
            return (img[0], None), (img[1], None)
        mask = self.cache.file_feature(mask_path, "L")
        if mask is None:
            return None
        return (img[0], mask[0]), (img[1], mask[1])

    def __repr__(self) -> str:
        return f"CachedPreprocess({self.base!r}, cache={self.cache.root})"


def attach_cache(model, cache: FeatureCache) -> None:
    """Make ``model`` read through ``cache``: ``model.preprocess`` yields cached features, and the backbone's
    ``encode_image`` (and ``encode_text`` when the text tower is cached) run only the live part on them."""
    if isinstance(model.preprocess, CachedPreprocess):
        raise UserInputError("this model already reads through a feature cache")
    backbone = model.backbone
    model._uncached_preprocess = model.preprocess
    model.preprocess = CachedPreprocess(cache, model.preprocess)
    backbone.encode_image = cache.split.live
    if cache.text is not None:
        text = backbone.clip.text

        def encode_text(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            hidden = cache.text_hidden(tokens)
            attention = (tokens != backbone.pad_token_id).long()
            pooled = text.proj(text.pooler(SimpleNamespace(last_hidden_state=hidden), attention))
            return hidden, pooled

        backbone.encode_text = encode_text
    model.feature_cache = cache


def detach_cache(model) -> None:
    """Undo ``attach_cache``."""
    if not isinstance(model.preprocess, CachedPreprocess):
        return
    model.preprocess = model._uncached_preprocess
    del model._uncached_preprocess
    for name in ("encode_image", "encode_text"):
        model.backbone.__dict__.pop(name, None)
    model.feature_cache = None


def cached_model(model, root, image_blocks: int = 0, cache_text: bool | None = None) -> FeatureCache:
    """Build a FeatureCache for ``model`` (text cached when its text tower is an all-frozen HF tower) and attach it."""
    if cache_text is None:
        cache_text = model.backbone.text_kind == "hf" and not any(
            p.requires_grad for p in model.backbone.clip.text.transformer.parameters())
    cache = FeatureCache(root, model, image_blocks=image_blocks, cache_text=cache_text)
    attach_cache(model, cache)
    return cache


def warm_benchmark(cache: FeatureCache, bench, splits: Iterable[str], masks: bool, progress: bool = False) -> int:
    """Cache every image (and mask) a benchmark's splits use; returns how many were encoded."""
    paths: list[tuple[Path, str]] = []
    for split in splits:
        ids = set(bench.split_images(split))
        for q in bench.queries(split):
            ids.add(q.reference)
            if q.target is not None:
                ids.add(q.target)
        for image_id in sorted(ids):
            paths.append((bench.image_path(image_id), "RGB"))
            if masks:
                paths.append((bench.mask_path(image_id), "L"))
    return cache.warm(paths, progress=progress)



def setup_small_compute(cfg, model, bench=None, progress: bool = False) -> FeatureCache | None:
    """What a TrainConfig's small-compute options ask for: freeze the backbone (all but its last blocks), attach
    a feature cache and fill it for the training and validation splits. Returns the cache, or None."""
    from offset_cir.train.freeze import freeze_backbone

    partial = cfg.trainable_image_blocks or cfg.trainable_text_blocks
    if not cfg.freeze_backbone:
        if partial or cfg.feature_cache:
            raise UserInputError("trainable_image_blocks, trainable_text_blocks and feature_cache need "
                                 "freeze_backbone=true (they say what stays trainable / what is cached)")
        return None
    freeze_backbone(model, cfg.trainable_image_blocks, cfg.trainable_text_blocks)
    if not cfg.feature_cache:
        return None
    cache = cached_model(model, cfg.feature_cache, image_blocks=cfg.trainable_image_blocks)
    if bench is not None:
        splits = [cfg.data.train_split] + ([cfg.data.val_split] if cfg.data.val_split else [])
        n = warm_benchmark(cache, bench, splits, masks=model.uses_masks, progress=progress)
        log.info("feature cache %s: %d images encoded, the rest found", cache.root, n)
    return cache
