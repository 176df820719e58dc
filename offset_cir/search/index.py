"""Opening and searching a built index: ``Index.open(path).search(image, text, k)`` (a read-only view).

An index folder holds (written by :mod:`offset_cir.search.build`, all atomically; ``manifest.json`` is the commit
point)::

    manifest.json           format, version, generation, count, dim, dtype, checkpoint path + hash, search engine
    model_config.json       the model's ModelConfig
    features-<gen>.npy      [N, D] target features k = L2norm(mean F_t) (SPEC section 3, "Target"), float16 default
    items-<gen>.jsonl       one line per feature row: id, path, mask, size, mtime_ns (rows sorted by id)
    faiss-<gen>.index       FAISS index for large galleries (HNSW or IVF, see ``offset_cir.search.ann``)
    shards/                 work in progress: shard-<hash>.npy + shard-<hash>.json (the .json marks completion)
    masks/                  masks made by the mask pipeline for gallery images that had none

The checkpoint hash in the manifest is ``sha256:`` + :func:`offset_cir.model.checkpoint.checkpoint_hash` (an index
built from an in-memory model records ``state:`` + a hash of its state dict instead). Searching encodes the
composed query q (reference image + mask + text) and ranks the gallery by cosine (SPEC section 1, step 8).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from offset_cir.errors import CheckpointError, UserInputError
from offset_cir.hashing import HASH_PREFIX
from offset_cir.io import read_jsonl
from offset_cir.search import ann as _ann

log = logging.getLogger(__name__)

FORMAT = "offset-cir-index"
VERSION = 1
#: prefix of a checkpoint's identity in a manifest (the hex digest is the checkpoint module's ``checkpoint_hash``)


class MaskRequiredError(UserInputError):
    """The model was trained with masks, the query has none and no mask pipeline is configured."""


class Hit(NamedTuple):
    """One search result: gallery id, image path on the server, cosine score."""

    id: str
    path: str
    score: float


# ----------------------------------------------------------------------------------------------- the folder


def read_manifest(out: Path) -> dict | None:
    """The manifest of the index at ``out`` (None when there is none); a foreign or newer one is refused."""
    m = out / "manifest.json"
    if not m.exists():
        return None
    try:
        man = json.loads(m.read_text())
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{m} is not valid JSON ({exc})") from None
    if man.get("format") != FORMAT:
        raise UserInputError(f"{m}: not an offset-cir index (field 'format' is {man.get('format')!r}, "
                             f"expected {FORMAT!r})")
    if int(man.get("version", -1)) > VERSION:
        raise UserInputError(f"{m}: index version {man.get('version')} is newer than this offset-cir "
                             f"understands ({VERSION})")
    return man


def model_state_hash(model) -> str:
    """``state:<hex>``: a hash of a model's state dict, for indexes built from an in-memory model. A model that
    carries its checkpoint's identity (an ONNX encoder: ``checkpoint_hash``) is identified by that instead."""
    import torch

    carried = getattr(model, "checkpoint_hash", None)
    if isinstance(carried, str) and carried.startswith(HASH_PREFIX):
        return carried
    h = hashlib.sha256()
    sd = model.state_dict() if hasattr(model, "state_dict") else {}
    if not sd:
        raise CheckpointError(f"{type(model).__name__} has no weights to identify it by and carries no checkpoint "
                              "hash: pass checkpoint= so the index can tell models apart")
    for name in sorted(sd):
        t = sd[name]
        if isinstance(t, torch.Tensor):
            h.update(name.encode() + b"\0" + str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return "state:" + h.hexdigest()


def uses_target_mask(model) -> bool:
    """Whether gallery (target) images need masks: ``uses_target_mask`` when the model has it (ablation
    "w/o Target_VFM" encodes targets without masks), else ``uses_masks``."""
    return bool(getattr(model, "uses_target_mask", model.uses_masks)) and bool(model.uses_masks)


def uses_query_mask(model) -> bool:
    """Whether a composed query needs the reference's mask (``uses_query_mask`` when the model has it)."""
    return bool(getattr(model, "uses_query_mask", model.uses_masks)) and bool(model.uses_masks)


def load_pil(source, what: str = "image", mode: str = "RGB"):
    """Open ``source`` (PIL image, path or file object) as a PIL image in ``mode``; a clear error otherwise."""
    from PIL import Image

    from offset_cir.data.common import ImageReadError, decode_image

    if isinstance(source, Image.Image):
        return source.convert(mode)
    try:
        return decode_image(source, mode)
    except FileNotFoundError:
        raise UserInputError(f"{what} {source} does not exist") from None
    except ImageReadError as exc:
        raise UserInputError(f"{what} {source} could not be read as an image: {exc}") from None


# ----------------------------------------------------------------------------------------------- query side


class Index:
    """A read-only, opened index: ``Index.open(path).search(image, text, k)``."""

    def __init__(self, path: Path, manifest: dict, items: list[dict], features: np.ndarray, engine, model,
                 mask_generator=None, device=None):
        self.path = path
        self.manifest = manifest
        self.items = items
        self.features = features
        self.engine = engine
        self.exact = engine if isinstance(engine, _ann.ExactSearch) else _ann.ExactSearch(features)
        self._model = model
        self.mask_generator = mask_generator
        self.device = device
        self.row_of = {it["id"]: r for r, it in enumerate(items)}

    @staticmethod
    def build(out, images, **settings):
        """Create or update an index: :func:`offset_cir.search.build.build_index`."""
        from offset_cir.search.build import build_index

        return build_index(out, images, **settings)

    @classmethod
    def open(cls, path: str | os.PathLike, *, model=None, checkpoint=None, mask_generator=None, device=None,
             exact: bool = False, load_model: bool = True, verify_checkpoint: bool = True,
             runtime: str = "torch", onnx_dir=None) -> "Index":
        """Open the index at ``path``. The model is ``model``, else ``checkpoint``, else the checkpoint recorded in
        the manifest; its weights must hash to the manifest's hash. ``exact`` forces exact search. ``runtime``
        "onnx" encodes queries with onnxruntime (``offset_cir.export.runtime``): the export folder ``onnx_dir``,
        else the checkpoint exported on the fly."""
        path = Path(path).resolve()
        man = read_manifest(path)
        if man is None:
            raise UserInputError(f"{path} is not an index (no manifest.json); build one with `offset index`")
        items = read_jsonl(path / man["items"])
        feats = np.load(path / man["features"], mmap_mode="r")  # read-only mapping
        if feats.shape != (len(items), man["dim"]):
            raise UserInputError(f"{path}: features {feats.shape} do not match {len(items)} items of width "
                                 f"{man['dim']}")
        s = man.get("search", {})
        if exact or s.get("kind", "exact") == "exact":
            engine = _ann.ExactSearch(feats)
        else:
            engine = _ann.FaissSearch.load(path / s["file"], s["kind"], s["param"])
        idx = cls(path, man, items, feats, engine, None, mask_generator, device)
        idx._checkpoint = checkpoint
        idx._verify = verify_checkpoint
        idx._runtime = (runtime, onnx_dir)
        if model is not None:
            idx._set_model(model)
        elif load_model:
            idx._load_model()
        return idx

    # -- model
    def _load_model(self):
        import time

        import offset_cir

        runtime, onnx_dir = getattr(self, "_runtime", ("torch", None))
        if runtime != "torch":  # onnxruntime: the export's checkpoint hash is checked against the manifest's
            from offset_cir.export.runtime import load_encoder

            ckpt = self._checkpoint if onnx_dir else (self._checkpoint or self.manifest["checkpoint"].get("path"))
            want = self.manifest["checkpoint"]["hash"] if self._verify else None
            t0 = time.perf_counter()
            log.info("loading the %s encoder (%s) ...", runtime, onnx_dir or ckpt)
            self._set_model(load_encoder(ckpt, runtime, onnx_dir=onnx_dir, expected_hash=want))
            log.info("loaded the %s encoder in %.1f s", runtime, time.perf_counter() - t0)
            return
        ckpt = self._checkpoint or self.manifest["checkpoint"].get("path")
        if ckpt is None:
            raise CheckpointError(f"index {self.path} was built from an in-memory model; pass model= or checkpoint=")
        t0 = time.perf_counter()
        if self._verify:
            log.info("checking that checkpoint %s is the one index %s was built with", ckpt, self.path)
            from offset_cir.model.checkpoint import checkpoint_hash

            h = HASH_PREFIX + checkpoint_hash(ckpt)
            want = self.manifest["checkpoint"]["hash"]
            if want.startswith(HASH_PREFIX) and h != want:
                raise CheckpointError(f"checkpoint {ckpt} hashes to {h[:19]}…, but index {self.path} was built with "
                                      f"{want[:19]}…: its features would not match this model's queries")
        log.info("loading checkpoint %s ...", ckpt)
        model = offset_cir.load_checkpoint(ckpt)
        self._set_model(model)
        log.info("loaded checkpoint %s in %.1f s (%s, on %s)", ckpt, time.perf_counter() - t0,
                 getattr(getattr(model, "config", None), "backbone", type(model).__name__), self.device)

    def _set_model(self, model):
        if int(model.embed_dim) != int(self.manifest["dim"]):
            raise CheckpointError(f"model embeds in {model.embed_dim} dimensions, index {self.path} holds "
                                  f"{self.manifest['dim']}")
        want = self.manifest["checkpoint"]["hash"]
        if self._verify and want.startswith("state:") and model_state_hash(model) != want:
            raise CheckpointError(f"this model is not the one index {self.path} was built with (state hash differs)")
        from offset_cir.device import choose_device

        self.device = choose_device(self.device)
        if hasattr(model, "to"):
            model = model.to(self.device)
        if hasattr(model, "eval"):
            model.eval()
        self._model = model

    @property
    def model(self):
        if self._model is None:
            self._load_model()
        return self._model

    # -- facts
    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> list[str]:
        return [it["id"] for it in self.items]

    @property
    def uses_masks(self) -> bool:
        return bool(self.manifest.get("needs_masks"))  # the manifest's key (its format is unchanged)

    def item(self, image_id: str) -> dict:
        """The stored record of gallery image ``image_id`` (KeyError when unknown)."""
        return self.items[self.row_of[image_id]]

    # -- query
    def encode_query(self, image, text: str, mask=None) -> np.ndarray:
        """Composed query feature q [D] (SPEC section 3, TGFR) for a reference image, its mask and a text.

        When the model needs masks and ``mask`` is None, the mask pipeline (if configured) makes one; otherwise
        :class:`MaskRequiredError` says so. A mask must have its image's size (UserInputError otherwise)."""
        import torch

        if not isinstance(text, str) or not text.strip():
            raise UserInputError("the modification text is empty; say what should change (e.g. 'make it red')")
        model = self.model
        pil = load_pil(image, "reference image")
        mask_t = None
        if uses_query_mask(model):
            if mask is None:
                if self.mask_generator is None:
                    raise MaskRequiredError(
                        "this model was trained with masks (use_masks=True) and the reference image has none: "
                        "pass mask= (a grayscale image, white = the part that matters) or open the index with a "
                        "mask_generator= (the mask pipeline)")
                mask = self.mask_generator([pil])[0]
            mpil = load_pil(mask, "reference mask", mode="L")
            check_mask_size(pil, mpil, image, mask)
            mask_t = model.preprocess.mask(mpil, train=False)[None].to(self.device)
        img_t = model.preprocess.image(pil, train=False)[None].to(self.device)
        with torch.inference_mode():
            q = model.encode_query(img_t, mask_t, [text])
        return q[0].float().cpu().numpy()

    def query_for_id(self, ref_id: str, text: str) -> np.ndarray:
        """The composed query q [D] with gallery image ``ref_id`` as reference (and its stored mask)."""
        if ref_id not in self.row_of:
            raise UserInputError(f"no image with id {_clip(ref_id)} in index {self.path}")
        it = self.item(ref_id)
        mask = it.get("mask")
        if uses_query_mask(self.model) and mask is None and self.mask_generator is None:
            raise MaskRequiredError(f"gallery image {ref_id!r} has no stored mask and the model needs one; "
                                    f"configure the mask pipeline or add {ref_id}-segmask.png")
        return self.encode_query(it["path"], text, mask)

    def search_features(self, queries: np.ndarray, k: int = 10, exclude: list[int | None] | None = None,
                        exact: bool = False):
        """Rank the gallery for query features [B,D]: ``(scores [B,k], rows [B,k])``, row -1 = no result."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        engine = self.exact if exact else self.engine
        return engine.search(q, int(k), exclude)

    def _hits(self, scores, rows) -> list[Hit]:
        return [Hit(self.items[r]["id"], self.items[r]["path"], float(s)) for s, r in zip(scores, rows) if r >= 0]

    def search(self, image, text: str, k: int = 10, mask=None, exact: bool = False) -> list[Hit]:
        """Top-k gallery images for a reference ``image`` (path or PIL), a modification ``text`` and an optional
        ``mask``; ranked (id, path, score), best first."""
        _check_k(k)
        q = self.encode_query(image, text, mask)
        s, r = self.search_features(q[None], k, exact=exact)
        return self._hits(s[0], r[0])

    def search_id(self, ref_id: str, text: str, k: int = 10, exclude_reference: bool = True,
                  exact: bool = False) -> list[Hit]:
        """Like :meth:`search` with a gallery image as reference: its stored mask is used and, by default, the
        reference itself is left out of the ranking (SPEC section 7)."""
        _check_k(k)
        q = self.query_for_id(ref_id, text)
        s, r = self.search_features(q[None], k, exclude=[self.row_of[ref_id]] if exclude_reference else None,
                                    exact=exact)
        return self._hits(s[0], r[0])


def _clip(text: str, limit: int = 80) -> str:
    """``repr`` of a client-given string for a message, cut to ``limit`` characters (ids can be arbitrarily long)."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def _describe(source, what: str) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"{what} {source}"
    return f"the {what}"


def check_mask_size(image, mask, image_source=None, mask_source=None, kind: str = "reference ") -> None:
    """Refuse a mask whose size differs from its image's (PIL images), naming both sizes (and files when known).
    ``kind`` prefixes the nouns: "reference " for a query, "" for a gallery image."""
    if tuple(mask.size) != tuple(image.size):
        raise UserInputError(
            f"{_describe(mask_source, kind + 'mask')} is {mask.size[0]}x{mask.size[1]} pixels but "
            f"{_describe(image_source, kind + 'image')} is {image.size[0]}x{image.size[1]}: a mask must have "
            f"the size of its image")


def _check_k(k) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise UserInputError(f"k must be a positive whole number, got {k!r}")


def make_mask_generator(captioner=None, segmenter=None, device=None):
    """The mask pipeline (``offset_cir.masks.MaskGenerator``) when both model folders are given, else None."""
    if not captioner and not segmenter:
        return None
    if not (captioner and segmenter):
        raise UserInputError("the mask pipeline needs both --captioner DIR and --segmenter DIR")
    try:
        from offset_cir.masks import MaskGenerator
    except ImportError as exc:
        raise UserInputError(f"the mask pipeline is not installed ({exc}); install the 'segment' extra") from None
    from offset_cir.device import choose_device

    as_spec = (lambda x: str(x) if isinstance(x, os.PathLike) else x)
    return MaskGenerator(captioner=as_spec(captioner), segmenter=as_spec(segmenter),
                         device=str(choose_device(device)))
