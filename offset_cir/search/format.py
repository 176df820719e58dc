"""The index folder's format: manifest, item records, feature generations and shards, read and written here only.

An index folder holds (every file written atomically through :mod:`offset_cir.io`; ``manifest.json`` last, the
commit point of each build or update)::

    manifest.json           format, version, generation, count, dim, dtype, checkpoint path + identity, baseline,
                            search engine
    model_config.json       the model's config (its ``to_dict()``; a baseline's config dict)
    features-<gen>.npy      [N, D] target features k = L2norm(mean F_t) (docs/model.md#target), float16
    items-<gen>.jsonl       one record per feature row: id, path, size, mtime_ns, mask, mask_mtime_ns (sorted by id)
    faiss-<gen>.index       FAISS index for large galleries (HNSW or IVF, see ``offset_cir.search.ann``)
    shards/                 work in progress: shard-<hash>.npy + shard-<hash>.json (the .json marks completion)
    masks/                  masks made by the mask pipeline for gallery images that had none

The checkpoint identity in the manifest is ``sha256:`` + :func:`offset_cir.model.checkpoint.checkpoint_hash`, or
``state:`` + a hash of the state dict for an index built from an in-memory model, or a training-free baseline's
``target_identity`` (``baseline-target:...``: its backbone and weights, not its query mode, so one index serves the
three modes; the manifest's ``baseline`` then holds its :class:`~offset_cir.model.baseline.BaselineSpec`, null for
a trained model) (:func:`model_identity`).
Whether the model uses masks is the manifest's ``uses_masks``; an older manifest carries
``needs_masks``, which :func:`manifest_uses_masks` reads too.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np

from offset_cir import io
from offset_cir.errors import CheckpointError, UserInputError
from offset_cir.hashing import is_tagged, tagged

log = logging.getLogger(__name__)

FORMAT = "offset-cir-index"
VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_CONFIG_NAME = "model_config.json"
SHARDS_DIR = "shards"
GENERATED_MASKS_DIR = "masks"
#: prefix of the identity of an index built from an in-memory model (a hash of its state dict)
STATE_PREFIX = "state:"
#: how the index's JSON files are written (manifest, model config, shard markers)
JSON_STYLE = {"indent": 1, "sort_keys": True}
#: the manifest key that said whether the model uses masks, in an older manifest, for ``uses_masks``
LEGACY_USES_MASKS_KEY = "needs_masks"
_GENERATION_FILE = re.compile(r"(features|items|faiss)-\d{6}\.")


def now() -> str:
    """The time stamps of manifests and shard markers: UTC, ISO 8601, seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------- the manifest


def read_index_manifest(folder: Path) -> dict | None:
    """The manifest of the index at ``folder`` (None when there is none); a foreign or newer one is refused."""
    m = Path(folder) / MANIFEST_NAME
    if not m.exists():
        return None
    return io.read_format_json(m, FORMAT, VERSION, "index")


def manifest_uses_masks(manifest: dict) -> bool:
    """Whether the index's model uses masks: ``uses_masks``, or ``needs_masks`` in an older manifest."""
    if "uses_masks" in manifest:
        return bool(manifest["uses_masks"])
    return bool(manifest.get(LEGACY_USES_MASKS_KEY))


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write the manifest: the commit point of a build (the files it names must be written before)."""
    io.write_json(Path(folder) / MANIFEST_NAME, manifest, **JSON_STYLE)


def write_model_config(folder: Path, model) -> None:
    """``model_config.json``: the model's config as its ``to_dict()`` gives it, or as it is when it is a dict (a
    baseline's); {} for a model without one."""
    cfg = getattr(model, "config", None)
    as_dict = {} if cfg is None else (dict(cfg) if isinstance(cfg, dict) else cfg.to_dict())
    io.write_json(Path(folder) / MODEL_CONFIG_NAME, as_dict, **JSON_STYLE)


# ----------------------------------------------------------------------------------------------- generations


@dataclasses.dataclass(frozen=True)
class Generation:
    """The file names of one generation of the index (each build that changes something writes a new one)."""

    number: int

    @property
    def features(self) -> str:
        return f"features-{self.number:06d}.npy"

    @property
    def items(self) -> str:
        return f"items-{self.number:06d}.jsonl"

    @property
    def faiss(self) -> str:
        return f"faiss-{self.number:06d}.index"

    @classmethod
    def after(cls, manifest: dict | None) -> "Generation":
        """The generation that follows the one ``manifest`` describes (the first when there is none)."""
        return cls(int((manifest or {}).get("generation", 0)) + 1)


def read_items(folder: Path, manifest: dict) -> list[dict]:
    """The item records of the manifest's generation, one per feature row."""
    return io.read_jsonl(Path(folder) / manifest["items"])


def load_features(folder: Path, manifest: dict, count: int | None = None) -> np.ndarray:
    """The manifest's features as a read-only memory map; ``count`` rows are expected when given."""
    feats = np.load(Path(folder) / manifest["features"], mmap_mode="r")
    if count is not None and feats.shape != (count, manifest["dim"]):
        raise UserInputError(f"{folder}: features {feats.shape} do not match {count} items of width "
                             f"{manifest['dim']}")
    return feats


def write_features(path: Path, sources: list[np.ndarray], source_of: np.ndarray, row_of: np.ndarray,
                   dtype: str, dim: int, block: int = 65536) -> None:
    """Write row i of the new features from ``sources[source_of[i]][row_of[i]]``, in blocks of ``block`` rows so a
    large gallery is never held in memory (sources may be memory maps, read in increasing row order)."""
    from numpy.lib.format import open_memmap

    n = len(source_of)
    with io.atomic_path(path) as tmp:
        arr = open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, dim))
        for s in range(0, n, block):
            e = min(n, s + block)
            codes = source_of[s:e]
            for c in np.unique(codes):
                sel = np.flatnonzero(codes == c)
                rows = row_of[s:e][sel]
                order = np.argsort(rows)
                arr[s + sel[order]] = np.asarray(sources[c][rows[order]], dtype=dtype)
        arr.flush()
        del arr


def write_items(folder: Path, name: str, records) -> None:
    io.write_jsonl(Path(folder) / name, records, sort_keys=True)


def is_leftover(path: Path) -> bool:
    """A temporary file of an interrupted write: ``offset_cir.io``'s, or the ``.tmp`` of older versions."""
    return path.name.endswith(".tmp") or io.is_temporary(path)


def remove_replaced(folder: Path, keep: set[str]) -> None:
    """Delete the generation files not in ``keep`` and the leftovers of interrupted writes."""
    for p in Path(folder).iterdir():
        if p.is_file() and ((_GENERATION_FILE.match(p.name) and p.name not in keep) or is_leftover(p)):
            p.unlink()


# ----------------------------------------------------------------------------------------------- item records


def file_record(image_id: str, path: Path, mask: Path | None) -> dict:
    """The record of a gallery image as its file is now: id, path, size, mtime_ns and its mask's path and mtime."""
    st = path.stat()
    return {"id": image_id, "path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "mask": str(mask) if mask is not None else None,
            "mask_mtime_ns": mask.stat().st_mtime_ns if mask is not None else None}


def same_file(record: dict, current: dict, use_masks: bool) -> bool:
    """Whether a stored record (index row, shard row or unreadable-file entry) describes ``current``: the same
    path, size and modification time, and, when gallery images are encoded with masks, the same mask file."""
    if any(record.get(k) != current.get(k) for k in ("path", "size", "mtime_ns")):
        return False
    if not use_masks or "error" in record:
        return True
    return (record.get("mask"), record.get("mask_mtime_ns")) == (current.get("mask"), current.get("mask_mtime_ns"))


def skipped_record(record: dict) -> dict:
    """The manifest's entry for an unreadable image: what identifies the file, and the error."""
    return {k: record[k] for k in ("id", "path", "size", "mtime_ns", "error") if k in record}


# ----------------------------------------------------------------------------------------------- shards


@dataclasses.dataclass(frozen=True)
class Shard:
    """A completed shard: its marker's content (``items``, ``skipped``, checkpoint identity, dim) and its files."""

    meta: dict
    npy: Path
    marker: Path

    @property
    def items(self) -> list[dict]:
        return list(self.meta.get("items", []))

    @property
    def skipped(self) -> list[dict]:
        return list(self.meta.get("skipped", []))

    def features(self) -> np.ndarray:
        return np.load(self.npy, mmap_mode="r")

    def remove(self) -> None:
        for p in (self.npy, self.marker):
            p.unlink(missing_ok=True)


def shard_name(ids: list[str]) -> str:
    """A shard's name: a hash of the ids it holds, so a rerun finds the shard of the same images."""
    return "shard-" + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:20]


def shard_done(folder: Path, name: str) -> bool:
    return (Path(folder) / SHARDS_DIR / (name + ".json")).exists()


def write_shard(folder: Path, name: str, features: np.ndarray, identity: str, dim: int, items: list[dict],
                skipped: list[dict]) -> None:
    """Features first, then the marker that says the shard is complete."""
    shard_dir = Path(folder) / SHARDS_DIR
    io.save_npy(shard_dir / (name + ".npy"), features)
    meta = {"checkpoint_hash": identity, "dim": dim, "items": items, "skipped": skipped, "created": now()}
    io.write_json(shard_dir / (name + ".json"), meta, **JSON_STYLE)


def completed_shards(folder: Path, identity: str, dim: int) -> list[Shard]:
    """Shards whose marker exists and whose features match it; stale or foreign ones are ignored."""
    shard_dir = Path(folder) / SHARDS_DIR
    out: list[Shard] = []
    if not shard_dir.is_dir():
        return out
    for marker in sorted(shard_dir.glob("shard-*.json")):
        try:
            meta = json.loads(marker.read_text())
            npy = marker.with_suffix(".npy")
            arr = np.load(npy, mmap_mode="r")
        except Exception as exc:  # a half-written shard: encode again
            log.warning("ignoring unreadable shard %s (%s)", marker.name, exc)
            continue
        if meta.get("checkpoint_hash") != identity or arr.ndim != 2 or arr.shape[1] != dim \
                or arr.shape[0] != len(meta.get("items", [])):
            log.warning("ignoring shard %s (another checkpoint or size)", marker.name)
            continue
        out.append(Shard(meta, npy, marker))
    return out


def remove_shard_leftovers(folder: Path) -> None:
    for p in (Path(folder) / SHARDS_DIR).iterdir():
        if p.is_file() and is_leftover(p):
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- identity


def model_state_hash(model) -> str:
    """``state:<hex>``: a hash of a model's state dict, for indexes built from an in-memory model. A model that
    carries its checkpoint's identity (an ONNX encoder: ``checkpoint_hash``) is identified by that instead."""
    import torch

    carried = getattr(model, "checkpoint_hash", None)
    if is_tagged(carried):
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
    return STATE_PREFIX + h.hexdigest()


def model_source(model, checkpoint=None) -> str:
    """What a model is, for a message: a baseline's backbone and weights, the checkpoint, or "this model"."""
    if model is not None and getattr(model, "target_identity", None) is not None and hasattr(model, "label"):
        return model.label()
    return f"checkpoint {checkpoint}" if checkpoint is not None else "this model"


def manifest_baseline(folder: Path, manifest: dict):
    """The :class:`~offset_cir.model.baseline.BaselineSpec` the index at ``folder`` was built with (its manifest's
    ``baseline``), None for an index of a trained model."""
    recorded = manifest.get("baseline")
    if recorded is None:
        return None
    from offset_cir.model.baseline import BaselineSpec

    return BaselineSpec.from_json(recorded, source=str(Path(folder) / MANIFEST_NAME))


def index_source(folder: Path, manifest: dict) -> str:
    """``index FOLDER``, with the baseline it holds when it holds one (for a message)."""
    spec = manifest_baseline(folder, manifest)
    return f"index {folder}" + (f" (the baseline of {spec.describe()})" if spec is not None else "")


def model_identity(model, checkpoint=None) -> str:
    """What the manifest and shards record as the features' source: a baseline's ``target_identity`` (even when
    its backbone is a checkpoint's: its features are not the trained model's), the checkpoint's ``sha256:`` hash
    when there is a checkpoint, else :func:`model_state_hash`."""
    target = getattr(model, "target_identity", None) if model is not None else None
    if target is not None:
        return str(target)
    if checkpoint is not None:
        from offset_cir.model.checkpoint import checkpoint_hash

        return tagged(checkpoint_hash(checkpoint))
    return model_state_hash(model)
