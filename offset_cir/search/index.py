"""Opening and searching a built index: ``Index.open(path).search(image, text, k)`` (a read-only view).

The folder is :mod:`offset_cir.search.format`'s. Opening loads the model the index was built with (or the one
given) and checks its identity against the manifest's; searching encodes the composed query q (reference image
+ mask + text) and ranks the gallery by cosine (docs/model.md#scoring). An index built with a training-free
baseline (``offset index --baseline``) opens its backbone again and answers in any of the three query modes: the
gallery features are the same for all three.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

import numpy as np

from offset_cir.errors import CheckpointError, UserInputError
from offset_cir.hashing import is_tagged
from offset_cir.search import ann
from offset_cir.search import format as fmt
from offset_cir.search.inputs import check_mask_size, load_pil, short_repr, uses_query_mask

log = logging.getLogger(__name__)


class MaskRequiredError(UserInputError):
    """The model was trained with masks, the query has none and no mask pipeline is configured."""


class PreparedQuery(NamedTuple):
    """A query's model inputs: the preprocessed reference image [3, H, W], its mask (None when the model uses
    none) and the modification text."""

    image: Any
    mask: Any
    text: str


class Hit(NamedTuple):
    """One search result: gallery id, image path on the server, cosine score."""

    id: str
    path: str
    score: float


def _check_k(k) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise UserInputError(f"k must be a positive whole number, got {k!r}")


class Index:
    """A read-only, opened index: ``Index.open(path).search(image, text, k)``.

    Everything it holds is given to the constructor (:meth:`open` reads the folder and loads the model first):
    the folder's ``path``, its ``manifest``, the item records (one per feature row), the ``features`` [N, D], the
    search ``engine`` (``offset_cir.search.ann``), the ``model`` (ready: on ``device``, in eval mode) and the
    optional ``mask_generator`` that makes a query's mask when none is given."""

    def __init__(self, path: Path | None, manifest: dict, items: list[dict], features: np.ndarray, engine, model,
                 mask_generator=None, device=None, precision=None):
        self._path = Path(path) if path is not None else None
        self._manifest = manifest
        self._items = tuple(items)
        self._features = features
        self._engine = engine
        self._exact = engine if isinstance(engine, ann.ExactSearch) else ann.ExactSearch(features)
        self._model = model
        self._mask_generator = mask_generator
        self._device = device
        self._precision = precision
        self._batcher = None
        self._row_of = MappingProxyType({it["id"]: r for r, it in enumerate(self._items)})

    @classmethod
    def open(cls, path: str | os.PathLike, *, model=None, checkpoint=None, baseline: str | None = None,
             pretrained: str | None = None, mask_generator=None, device=None, exact: bool = False,
             verify_checkpoint: bool = True, runtime: str = "torch", onnx_dir=None,
             precision: str = "fp32") -> "Index":
        """Open the index at ``path``. The model is ``model``, else ``checkpoint``, else the checkpoint recorded in
        the manifest; its identity must be the manifest's. ``exact`` forces exact search. ``runtime`` "onnx"
        encodes queries with onnxruntime (``offset_cir.export.runtime``): the export folder ``onnx_dir``, else the
        checkpoint exported on the fly. ``precision`` "fp32", "bf16" or "auto" (``offset_cir.export.precision``).

        An index of a training-free baseline rebuilds the baseline its manifest records; ``baseline`` is the query
        mode ("image", "text", "image+text"; default: the one it was built with), ``pretrained`` the backbone's
        weights and ``checkpoint`` the checkpoint whose backbone it is, when the recorded files moved (checked
        against the index like any model). ``baseline`` and ``pretrained`` are refused for an index of a trained
        model."""
        path = Path(path).resolve()
        man = fmt.read_index_manifest(path)
        if man is None:
            raise UserInputError(f"{path} is not an index (no manifest.json); build one with `offset index`")
        items = fmt.read_items(path, man)
        feats = fmt.load_features(path, man, len(items))  # a read-only mapping
        s = man.get("search", {})
        if exact or s.get("kind", "exact") == "exact":
            engine = ann.ExactSearch(feats)
        else:
            engine = ann.FaissSearch.load(path / s["file"], s["kind"], s["param"])
        spec = _baseline_to_open(path, man, checkpoint=checkpoint, baseline=baseline, pretrained=pretrained)
        if spec is not None:
            checkpoint = None  # the spec names the backbone
        model, device = _ready_model(path, man, model=model, checkpoint=checkpoint, runtime=runtime,
                                     onnx_dir=onnx_dir, verify=verify_checkpoint, device=device, baseline=spec)
        from offset_cir.export.precision import use_precision

        model, choice = use_precision(model, precision)
        return cls(path, man, items, feats, engine, model, mask_generator, device, choice)

    # -- what it holds
    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def manifest(self) -> dict:
        return self._manifest

    @property
    def items(self) -> tuple[dict, ...]:
        """The item records, one per feature row (sorted by id)."""
        return self._items

    @property
    def features(self) -> np.ndarray:
        return self._features

    @property
    def engine(self):
        return self._engine

    @property
    def model(self):
        return self._model

    @property
    def mask_generator(self):
        return self._mask_generator

    @property
    def device(self):
        return self._device

    @property
    def precision(self):
        """The :class:`~offset_cir.export.precision.PrecisionChoice` queries are encoded under (None: not chosen
        here, the model as given)."""
        return self._precision

    @property
    def batcher(self):
        """The :class:`~offset_cir.search.batching.MicroBatcher` of query encodings, None when each query is
        encoded alone."""
        return self._batcher

    def batch_queries(self, max_batch: int = 8, max_wait: float = 0.005, on_batch=None) -> None:
        """Encode queries that arrive from several threads within ``max_wait`` seconds of each other in one model
        call (at most ``max_batch``), on one thread; ``max_batch`` 1 encodes each alone. ``on_batch(size)`` is told
        each batch's size."""
        from offset_cir.search.batching import MicroBatcher

        self.close()
        if max_batch > 1:
            self._batcher = MicroBatcher(self.encode_prepared, max_batch, max_wait, on_batch, name="query-batcher")

    def close(self) -> None:
        """Stop batching queries (queued ones are encoded first)."""
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()

    @property
    def row_of(self) -> Mapping[str, int]:
        """Gallery id -> feature row (read-only)."""
        return self._row_of

    # -- facts
    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._row_of

    @property
    def ids(self) -> list[str]:
        return [it["id"] for it in self._items]

    @property
    def uses_masks(self) -> bool:
        """Whether the index's model uses masks (as the manifest records it)."""
        return fmt.manifest_uses_masks(self._manifest)

    @property
    def uses_query_mask(self) -> bool:
        """Whether a composed query needs the reference's mask with this index's model."""
        return uses_query_mask(self._model)

    @property
    def baseline(self) -> dict | None:
        """The training-free baseline queries are encoded with (its spec: ``mode``, ``backbone``, ``pretrained``,
        ``checkpoint``, ``seed``), None for a trained model."""
        mode = getattr(self._model, "baseline", None)
        if mode is None:
            return None
        spec = getattr(self._model, "spec", None)
        return spec.to_json() if spec is not None else {"mode": mode}

    def item(self, image_id: str) -> dict:
        """The stored record of gallery image ``image_id`` (KeyError when unknown)."""
        return self._items[self._row_of[image_id]]

    # -- query
    def encode_query(self, image, text: str, mask=None) -> np.ndarray:
        """Composed query feature q [D] (docs/model.md#tgfr) for a reference image, its mask and a text.

        When the model needs masks and ``mask`` is None, the mask pipeline (if configured) makes one; otherwise
        :class:`MaskRequiredError` says so. A mask must have its image's size (UserInputError otherwise). With
        :meth:`batch_queries` on, the model call is shared with queries of other threads."""
        batcher = self._batcher
        if batcher is None:
            return self.encode_prepared([self.prepare_query(image, text, mask)])[0]
        with batcher.slot() as slot:
            return slot.run(self.prepare_query(image, text, mask))

    def prepare_query(self, image, text: str, mask=None) -> PreparedQuery:
        """A query's model inputs (see :meth:`encode_query`), checked and preprocessed, on the CPU."""
        if not isinstance(text, str) or not text.strip():
            raise UserInputError("the modification text is empty; say what should change (e.g. 'make it red')")
        model = self._model
        pil = load_pil(image, "reference image")
        mask_t = None
        if self.uses_query_mask:
            if mask is None:
                if self._mask_generator is None:
                    raise MaskRequiredError(
                        "this model was trained with masks (use_masks=True) and the reference image has none: "
                        "pass mask= (a grayscale image, white = the part that matters) or open the index with a "
                        "mask_generator= (the mask pipeline)")
                mask = self._mask_generator([pil])[0]
            mpil = load_pil(mask, "reference mask", mode="L")
            check_mask_size(pil, mpil, image, mask)
            mask_t = model.preprocess.mask(mpil, train=False)
        return PreparedQuery(model.preprocess.image(pil, train=False), mask_t, text)

    def encode_prepared(self, queries: list[PreparedQuery]) -> np.ndarray:
        """Composed query features [B, D] of prepared queries, in one model call."""
        import torch

        images = torch.stack([q.image for q in queries]).to(self._device)
        masks = None if queries[0].mask is None else torch.stack([q.mask for q in queries]).to(self._device)
        with torch.inference_mode():
            q = self._model.encode_query(images, masks, [p.text for p in queries])
        return q.float().cpu().numpy()

    def query_for_id(self, ref_id: str, text: str) -> np.ndarray:
        """The composed query q [D] with gallery image ``ref_id`` as reference (and its stored mask)."""
        if ref_id not in self._row_of:
            raise UserInputError(f"no image with id {short_repr(ref_id)} in index {self._path}")
        it = self.item(ref_id)
        mask = it.get("mask")
        if self.uses_query_mask and mask is None and self._mask_generator is None:
            raise MaskRequiredError(f"gallery image {ref_id!r} has no stored mask and the model needs one; "
                                    f"configure the mask pipeline or add {ref_id}-segmask.png")
        return self.encode_query(it["path"], text, mask)

    def search_features(self, queries: np.ndarray, k: int = 10, exclude: list[int | None] | None = None,
                        exact: bool = False):
        """Rank the gallery for query features [B,D]: ``(scores [B,k], rows [B,k])``, row -1 = no result."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        engine = self._exact if exact else self._engine
        return engine.search(q, int(k), exclude)

    def hits(self, scores, rows) -> list[Hit]:
        """One query's ranked ``(scores [k], rows [k])`` as hits, best first (rows -1 left out)."""
        return [Hit(self._items[r]["id"], self._items[r]["path"], float(s)) for s, r in zip(scores, rows) if r >= 0]

    def rank(self, query: np.ndarray, k: int = 10, exclude_id: str | None = None, exact: bool = False) -> list[Hit]:
        """The top-k gallery images for one query feature q [D]; ``exclude_id`` is left out of the ranking."""
        exclude = [self._row_of[exclude_id]] if exclude_id is not None else None
        s, r = self.search_features(np.asarray(query)[None], k, exclude=exclude, exact=exact)
        return self.hits(s[0], r[0])

    def search(self, image, text: str, k: int = 10, mask=None, exact: bool = False) -> list[Hit]:
        """Top-k gallery images for a reference ``image`` (path or PIL), a modification ``text`` and an optional
        ``mask``; ranked (id, path, score), best first."""
        _check_k(k)
        return self.rank(self.encode_query(image, text, mask), k, exact=exact)

    def search_id(self, ref_id: str, text: str, k: int = 10, exclude_reference: bool = True,
                  exact: bool = False) -> list[Hit]:
        """Like :meth:`search` with a gallery image as reference: its stored mask is used and, by default, the
        reference itself is left out of the ranking (docs/model.md#evaluation)."""
        _check_k(k)
        q = self.query_for_id(ref_id, text)
        return self.rank(q, k, exclude_id=ref_id if exclude_reference else None, exact=exact)


# ----------------------------------------------------------------------------------------------- the model


def _baseline_to_open(path: Path, manifest: dict, *, checkpoint, baseline, pretrained):
    """The :class:`~offset_cir.model.baseline.BaselineSpec` to build for the index at ``path``: the manifest's, with
    the query mode ``baseline``, the weights ``pretrained`` or the ``checkpoint`` given instead of its own; None for
    an index of a trained model (which refuses ``baseline`` and ``pretrained``)."""
    from offset_cir.model.baseline import check_mode

    spec = fmt.manifest_baseline(path, manifest)
    if spec is None:
        if baseline is not None or pretrained is not None:
            raise UserInputError(
                f"index {path} holds the features of a trained model (checkpoint "
                f"{manifest['checkpoint'].get('path')}), not a backbone's own: --baseline and --pretrained apply to "
                f"an index built with `offset index --baseline`")
        return None
    if baseline is not None:
        spec = spec.with_mode(check_mode(baseline, "--baseline"))
    if pretrained is not None:
        if spec.backbone is None:
            raise UserInputError(f"index {path} holds the baseline of {spec.describe()}: --pretrained applies to a "
                                 f"named backbone's baseline (give --checkpoint for this one's)")
        spec = dataclasses.replace(spec, pretrained=str(pretrained))
    if checkpoint is not None:
        if spec.checkpoint is None:
            raise UserInputError(f"index {path} holds the baseline of {spec.describe()}, not a checkpoint's: "
                                 f"--checkpoint does not apply (--pretrained gives its weights)")
        spec = dataclasses.replace(spec, checkpoint=str(checkpoint))
    return spec


def _load_model(path: Path, manifest: dict, checkpoint, runtime: str, onnx_dir, verify: bool, baseline=None):
    """The model of the checkpoint ``checkpoint`` or the manifest's, or its ONNX export, or the ``baseline``
    (a BaselineSpec) built; each checked against the manifest's identity before it is loaded. Returns (model, what
    was loaded, for the log)."""
    want = manifest["checkpoint"]["hash"]
    if baseline is not None:
        from offset_cir.export.runtime import load_encoder
        from offset_cir.model.checkpoint import require_same_checkpoint

        if verify:  # before the backbone is built
            require_same_checkpoint(baseline.target_identity(), want, found_in=baseline.label(),
                                    recorded_in=fmt.index_source(path, manifest))
        log.info("building %s ...", baseline.label())
        return load_encoder(None, runtime, onnx_dir=onnx_dir, baseline=baseline), baseline.label()
    if runtime != "torch":  # onnxruntime: the export's checkpoint hash is checked against the manifest's
        from offset_cir.export.runtime import load_encoder

        ckpt = checkpoint if onnx_dir else (checkpoint or manifest["checkpoint"].get("path"))
        what = f"the {runtime} encoder"
        log.info("loading %s (%s) ...", what, onnx_dir or ckpt)
        return load_encoder(ckpt, runtime, onnx_dir=onnx_dir, expected_hash=want if verify else None), what
    import offset_cir

    ckpt = checkpoint or manifest["checkpoint"].get("path")
    if ckpt is None:
        raise CheckpointError(f"index {path} was built from an in-memory model; pass model= or checkpoint=")
    if verify and is_tagged(want):
        from offset_cir.model.checkpoint import require_same_checkpoint

        log.info("checking that checkpoint %s is the one index %s was built with", ckpt, path)
        require_same_checkpoint(fmt.model_identity(None, ckpt), want,
                                found_in=f"checkpoint {ckpt}", recorded_in=f"index {path}")
    log.info("loading checkpoint %s ...", ckpt)
    return offset_cir.load_checkpoint(ckpt), f"checkpoint {ckpt}"


def _check_identity(path: Path, manifest: dict, model) -> None:
    """Refuse ``model`` unless its identity (a baseline's target identity, else its state hash) is the index's."""
    from offset_cir.model.checkpoint import require_same_checkpoint

    require_same_checkpoint(fmt.model_identity(model), manifest["checkpoint"]["hash"],
                            found_in=fmt.model_source(model), recorded_in=fmt.index_source(path, manifest))


def _ready_model(path: Path, manifest: dict, *, model, checkpoint, runtime: str, onnx_dir, verify: bool, device,
                 baseline=None):
    """The model to search the index at ``path`` with (``model``, else loaded), checked against the manifest, on
    its device and in eval mode: (model, device). A baseline's identity and an in-memory model's are checked here
    (a checkpoint's before it is loaded)."""
    t0 = time.perf_counter()
    loaded = None
    if model is None:
        model, loaded = _load_model(path, manifest, checkpoint, runtime, onnx_dir, verify, baseline)
    # a baseline on either side is told apart by its identity first (another backbone has another width too)
    baseline_side = getattr(model, "target_identity", None) is not None or manifest.get("baseline") is not None
    if verify and baseline_side:
        _check_identity(path, manifest, model)
    if int(model.embed_dim) != int(manifest["dim"]):
        raise CheckpointError(f"model embeds in {model.embed_dim} dimensions, index {path} holds "
                              f"{manifest['dim']}")
    if verify and not baseline_side and not is_tagged(manifest["checkpoint"]["hash"]):
        _check_identity(path, manifest, model)  # an in-memory model's state hash
    from offset_cir.device import choose_device

    device = choose_device(device)
    if hasattr(model, "to"):
        model = model.to(device)
    if hasattr(model, "eval"):
        model.eval()
    if loaded is not None:
        backbone = getattr(getattr(model, "config", None), "backbone", type(model).__name__)
        log.info("loaded %s in %.1f s (%s, on %s)", loaded, time.perf_counter() - t0, backbone, device)
    return model, device
