"""A searchable index of a user's own images: target features of a gallery folder, built and queried with OFFSET.

An index folder holds (all written atomically; ``manifest.json`` is the commit point)::

    manifest.json           format, version, generation, count, dim, dtype, checkpoint path + hash, search engine
    model_config.json       the model's ModelConfig
    features-<gen>.npy      [N, D] target features k = L2norm(mean F_t) (SPEC section 3, "Target"), float16 default
    items-<gen>.jsonl       one line per feature row: id, path, mask, size, mtime_ns (rows sorted by id)
    faiss-<gen>.index       FAISS index for large galleries (HNSW or IVF, see ``offset_cir.search.ann``)
    shards/                 work in progress: shard-<hash>.npy + shard-<hash>.json (the .json marks completion)
    masks/                  masks made by the mask pipeline for gallery images that had none

Building encodes only images that are not in the index yet (or whose file changed); work is written in shards,
so a killed run resumes where it stopped. Under ``torchrun`` every rank encodes its share of the shards and rank 0
merges them. Searching encodes the composed query q (reference image + mask + text) and ranks the gallery by
cosine (SPEC section 1, step 8).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np

from offset_cir.errors import CheckpointError, DatasetError, UserInputError
from offset_cir.search import ann as _ann

log = logging.getLogger(__name__)

FORMAT = "offset-cir-index"
VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: mask file names tried for image ``<stem>.<ext>`` (CIRR/Fashion200K, Shoes, FashionIQ naming; SPEC section 6)
MASK_SUFFIXES = ("-segmask.png", "-segmask.jpg", "-seg.png")
_MASK_NAME = re.compile(r".*-(segmask|seg)\.(png|jpg|jpeg)$", re.IGNORECASE)


class MaskRequiredError(UserInputError):
    """The model was trained with masks, the query has none and no mask pipeline is configured."""


class Hit(NamedTuple):
    """One search result: gallery id, image path on the server, cosine score."""

    id: str
    path: str
    score: float


# ----------------------------------------------------------------------------------------------- small helpers


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserInputError(f"{path}: line {lineno} is not JSON ({exc})") from None
    return out


def checkpoint_hash(path: str | os.PathLike) -> str:
    """``sha256:<hex>``: the package's checkpoint identity (:func:`offset_cir.model.checkpoint.checkpoint_hash`, the
    sha256 of ``model.safetensors``) with its prefix. Its errors pass through: a run folder is told to name
    ``RUN/best`` or ``RUN/last``, an ``hf-hub:`` name resolves through the cache."""
    from offset_cir.model.checkpoint import checkpoint_hash as package_hash

    return "sha256:" + package_hash(path)


def model_state_hash(model) -> str:
    """``state:<hex>``: a hash of a model's state dict, for indexes built from an in-memory model. A model that
    carries its checkpoint's identity (an ONNX encoder: ``checkpoint_hash``) is identified by that instead."""
    import torch

    carried = getattr(model, "checkpoint_hash", None)
    if isinstance(carried, str) and carried.startswith("sha256:"):
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


def _config_json(model) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg):
        return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    if isinstance(cfg, dict):
        return json.loads(json.dumps(cfg, default=str))
    return {"repr": repr(cfg)}


def target_needs_mask(model) -> bool:
    """Whether gallery (target) images need masks: ``target_needs_mask`` when the model has it (ablation
    "w/o Target_VFM" encodes targets without masks), else ``needs_masks``."""
    return bool(getattr(model, "target_needs_mask", model.needs_masks)) and bool(model.needs_masks)


def query_needs_mask(model) -> bool:
    """Whether a composed query needs the reference's mask (``query_needs_mask`` when the model has it)."""
    return bool(getattr(model, "query_needs_mask", model.needs_masks)) and bool(model.needs_masks)


def _default_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


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


# ----------------------------------------------------------------------------------------------- gallery scan


def _is_mask_name(name: str) -> bool:
    return bool(_MASK_NAME.match(name))


def scan_images(root: str | os.PathLike, exclude: Iterable[Path] = ()) -> list[tuple[str, Path]]:
    """Every image under ``root`` (recursively, hidden entries and mask files skipped) as ``(id, path)``.

    The id is the path relative to ``root`` without its extension (``shoes/img_1``); when two files differ only by
    extension both keep it (``a.png``, ``a.jpg``). Sorted by id.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DatasetError(f"images folder {root} does not exist or is not a folder")
    excl = {Path(e).resolve() for e in exclude}
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and (d / n).resolve() not in excl)
        for name in filenames:
            if name.startswith(".") or _is_mask_name(name):
                continue
            if name.lower().endswith(IMAGE_SUFFIXES):
                found.append(d / name)
    rels = [p.relative_to(root).as_posix() for p in found]
    stems = [r.rsplit(".", 1)[0] for r in rels]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    out = [(s if counts[s] == 1 else r, p) for s, r, p in zip(stems, rels, found)]
    out.sort(key=lambda t: t[0])
    return out


def find_mask(image: Path, image_id: str, masks_dir: Path | None, generated_dir: Path | None) -> Path | None:
    """The stored mask of a gallery image: ``<stem>-segmask.png`` (or ``-segmask.jpg`` / ``-seg.png``) beside it,
    in ``masks_dir`` (mirroring the gallery's sub-folders, or flat), or among the masks this index generated."""
    stem = image.name.rsplit(".", 1)[0]
    rel_parent = str(Path(image_id).parent) if "/" in image_id else ""
    places = [image.parent]
    if masks_dir is not None:
        places += [masks_dir / rel_parent, masks_dir] if rel_parent else [masks_dir]
    for place in places:
        for suf in MASK_SUFFIXES:
            cand = place / (stem + suf)
            if cand.is_file():
                return cand.resolve()
    if generated_dir is not None:
        cand = generated_dir / (image_id + "-segmask.png")
        if cand.is_file():
            return cand.resolve()
    return None


# ----------------------------------------------------------------------------------------------- encoding


class _GalleryDataset:
    """Items -> (row, image tensor, mask tensor or None, error or None); unreadable files are reported, not fatal."""

    def __init__(self, items: list[dict], preprocess, use_masks: bool):
        self.items = items
        self.preprocess = preprocess
        self.use_masks = use_masks

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        it = self.items[i]
        try:
            pil = load_pil(it["path"], "image")
            img = self.preprocess.image(pil, train=False)
            mask = None
            if self.use_masks:
                mpil = load_pil(it["mask"], "mask", mode="L")
                check_mask_size(pil, mpil, it["path"], it["mask"], kind="")
                mask = self.preprocess.mask(mpil, train=False)
            return i, img, mask, None
        except UserInputError as exc:
            return i, None, None, str(exc)
        except Exception as exc:  # a broken file must not stop a million-image run
            return i, None, None, f"{it['path']}: {type(exc).__name__}: {exc}"


def _collate(batch):
    import torch

    ok = [b for b in batch if b[3] is None]
    bad = [(b[0], b[3]) for b in batch if b[3] is not None]
    rows = [b[0] for b in ok]
    imgs = torch.stack([b[1] for b in ok]) if ok else None
    masks = torch.stack([b[2] for b in ok]) if ok and ok[0][2] is not None else None
    return rows, imgs, masks, bad


def encode_gallery(model, items: list[dict], *, batch_size: int = 32, num_workers: int = 0, device=None,
                   use_masks: bool | None = None, dtype: str = "float16", progress=None):
    """Target features of ``items`` (dicts with ``path`` and, when masks are used, ``mask``).

    Returns ``(features [M, D], rows_ok, errors)``: features for the readable items (in item order), their
    positions in ``items``, and ``{position: message}`` for the unreadable ones.
    """
    import torch
    from torch.utils.data import DataLoader

    device = device or next((p.device for p in _params(model)), torch.device("cpu"))
    use_masks = target_needs_mask(model) if use_masks is None else use_masks
    loader = DataLoader(_GalleryDataset(items, model.preprocess, use_masks), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate, shuffle=False)
    feats = np.zeros((len(items), int(model.embed_dim)), dtype=dtype)
    ok = np.zeros(len(items), dtype=bool)
    errors: dict[int, str] = {}
    with torch.inference_mode():
        for rows, imgs, masks, bad in loader:
            for r, msg in bad:
                errors[r] = msg
            if rows:
                out = model.encode_target(imgs.to(device), masks.to(device) if masks is not None else None)
                feats[rows] = out.float().cpu().numpy().astype(dtype)
                ok[rows] = True
            if progress is not None:
                progress.update(len(rows) + len(bad))
    keep = np.flatnonzero(ok)
    return feats[keep], keep.tolist(), errors


def _params(model):
    try:
        return list(model.parameters())
    except Exception:
        return []


# ----------------------------------------------------------------------------------------------- distributed


class _Dist:
    """torch.distributed when running under torchrun (WORLD_SIZE > 1), otherwise a single process."""

    def __init__(self, enabled: bool | None):
        self.rank, self.world, self._owned, self.dist = 0, 1, False, None
        if enabled is None:
            enabled = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if not enabled:
            return
        import torch
        import torch.distributed as dist

        self.dist = dist
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
            self._owned = True
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True when every rank says ok (so one failing rank does not leave the others waiting forever)."""
        if self.dist is None:
            return ok
        import torch

        dev = torch.device("cuda") if self.dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([0 if ok else 1], device=dev)
        self.dist.all_reduce(t)
        return int(t.item()) == 0

    def close(self) -> None:
        if self._owned:
            self.dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- build / update


@dataclasses.dataclass
class BuildReport:
    """What one ``build_index`` call did."""

    path: str
    count: int
    encoded: int
    reused: int
    removed: int
    skipped: list[dict]
    search: dict
    ann_table: str | None = None


def _read_manifest(out: Path) -> dict | None:
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


def _completed_shards(shard_dir: Path, ckpt_hash: str, dim: int) -> list[dict]:
    """Shards whose ``.json`` marker exists and whose features match it; stale or foreign ones are ignored."""
    out = []
    if not shard_dir.is_dir():
        return out
    for meta_path in sorted(shard_dir.glob("shard-*.json")):
        try:
            meta = json.loads(meta_path.read_text())
            npy = meta_path.with_suffix(".npy")
            arr = np.load(npy, mmap_mode="r")
        except Exception as exc:  # a half-written shard: encode again
            log.warning("ignoring unreadable shard %s (%s)", meta_path.name, exc)
            continue
        if meta.get("checkpoint_hash") != ckpt_hash or arr.ndim != 2 or arr.shape[1] != dim \
                or arr.shape[0] != len(meta.get("items", [])):
            log.warning("ignoring shard %s (another checkpoint or size)", meta_path.name)
            continue
        meta["_npy"] = npy
        meta["_json"] = meta_path
        out.append(meta)
    return out


def _same_file(record: dict, current: dict, use_masks: bool) -> bool:
    """Whether a stored record (index row, shard row or unreadable-file entry) describes ``current``: the same
    path, size and modification time, and, when gallery images are encoded with masks, the same mask file."""
    if any(record.get(k) != current.get(k) for k in ("path", "size", "mtime_ns")):
        return False
    if not use_masks or "error" in record:
        return True
    return (record.get("mask"), record.get("mask_mtime_ns")) == (current.get("mask"), current.get("mask_mtime_ns"))


def build_index(out: str | os.PathLike, images: str | os.PathLike, *, model=None, checkpoint=None,
                masks_dir=None, mask_generator=None, batch_size: int = 32, num_workers: int = 0,
                shard_size: int = 1024, dtype: str | None = None, exact_max: int = _ann.EXACT_MAX,
                hnsw_max: int = _ann.HNSW_MAX, prune: bool = False, progress: bool = True, device=None,
                distributed: bool | None = None, limit: int | None = None) -> BuildReport | None:
    """Create or update the index at ``out`` from the images under ``images`` (see the module docstring).

    Give ``checkpoint`` (a path for ``offset_cir.load_checkpoint``) or an in-memory ``model`` (or both: the model
    then must be the checkpoint's). Only images that are new or changed are encoded. ``limit`` stops after that
    many new images (the rest are added by the next call). ``dtype`` (float16 or float32) defaults to the existing
    index's, else float16. Returns the report on rank 0, None on other ranks.
    """
    from tqdm.auto import tqdm

    out = Path(out).resolve()
    images = Path(images).resolve()
    if not images.is_dir():  # before loading a model or creating anything
        raise DatasetError(f"images folder {images} does not exist or is not a folder")
    masks_dir = Path(masks_dir).resolve() if masks_dir else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise DatasetError(f"masks folder {masks_dir} does not exist")
    dist = _Dist(distributed)
    try:
        if model is None:
            if checkpoint is None:
                raise UserInputError("build_index needs a checkpoint or a model")
            import offset_cir

            log.info("loading checkpoint %s ...", checkpoint)
            model = offset_cir.load_checkpoint(checkpoint)
        ckpt_hash = checkpoint_hash(checkpoint) if checkpoint is not None else model_state_hash(model)
        device = device or _default_device()
        model = model.to(device) if hasattr(model, "to") else model
        if hasattr(model, "eval"):
            model.eval()
        dim = int(model.embed_dim)
        use_masks = target_needs_mask(model)

        man = _read_manifest(out)
        dtype = dtype or (man or {}).get("dtype", "float16")  # an update keeps the index's storage type
        if dtype not in ("float16", "float32"):
            raise UserInputError(f"dtype must be float16 or float32, got {dtype!r}")
        if man is not None:
            if man["checkpoint"]["hash"] != ckpt_hash:
                raise CheckpointError(
                    f"index {out} was built with checkpoint {man['checkpoint'].get('path')} "
                    f"({man['checkpoint']['hash'][:19]}…); this checkpoint hashes to {ckpt_hash[:19]}…: "
                    f"features of two models cannot be mixed, build a new index (another --out)")
            if Path(man["images_root"]) != images:
                raise UserInputError(
                    f"index {out} indexes {man['images_root']}, not {images}: an index covers one images folder")
        if dist.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "shards").mkdir(exist_ok=True)
        dist.barrier()

        # ---- what is there, what must be encoded
        scanned = scan_images(images, exclude=[out])
        if not scanned:
            raise DatasetError(f"no images under {images} (looked for {', '.join(IMAGE_SUFFIXES)})")
        old_items = _read_jsonl(out / man["items"]) if man else []
        old_by_id = {it["id"]: it for it in old_items}
        done_shards = _completed_shards(out / "shards", ckpt_hash, dim)
        in_shards: dict[str, list[dict]] = {}  # an image can be in several shards (changed between two runs)
        for sh in done_shards:
            for it in list(sh["items"]) + list(sh.get("skipped", [])):
                in_shards.setdefault(it["id"], []).append(it)
        old_skipped = {it["id"]: it for it in (man or {}).get("skipped", [])}
        gen_dir = out / "masks"
        todo: list[dict] = []
        current: dict[str, dict] = {}  # every image as it is now (the merge keeps the records that match)
        for image_id, path in scanned:
            st = path.stat()
            item = {"id": image_id, "path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            m = find_mask(path, image_id, masks_dir, gen_dir)
            item["mask"] = str(m) if m is not None else None
            item["mask_mtime_ns"] = m.stat().st_mtime_ns if m is not None else None
            current[image_id] = item
            # a record of this file as it is now (a finished shard, the index, or the list of unreadable files)
            records = in_shards.get(image_id, []) + [old_by_id.get(image_id), old_skipped.get(image_id)]
            if any(r is not None and _same_file(r, item, use_masks) for r in records):
                continue  # unchanged (unreadable files are retried only when they change)
            todo.append(item)
        if limit is not None:
            todo = todo[:max(0, int(limit))]
        dist.barrier()  # every rank has listed the shards before any rank writes one

        # ---- masks: stored ones, else the mask pipeline, else a clear error
        missing = [item for item in todo if use_masks and item["mask"] is None]
        if missing and mask_generator is None:
            first = ", ".join(Path(it["path"]).name for it in missing[:3])
            raise DatasetError(
                f"this model encodes gallery images with masks (needs_masks=True) but {len(missing)} of "
                f"{len(todo)} images have no mask (e.g. {first}); expected <stem>-segmask.png beside each "
                f"image or in --masks DIR, or configure "
                f"the mask pipeline (--captioner/--segmenter, `offset masks`) to make them")

        # ---- encode my share, one shard per chunk
        chunks = [todo[i:i + shard_size] for i in range(0, len(todo), shard_size)]
        mine = [c for j, c in enumerate(chunks) if j % dist.world == dist.rank]
        n_mine = sum(len(c) for c in mine)
        if dist.rank == 0:
            log.info("index %s: %d images, %d already indexed, %d to encode (%d shards, %d process(es))",
                     out, len(scanned), len(scanned) - len(todo), len(todo), len(chunks), dist.world)
        ok = True
        err: BaseException | None = None
        try:
            bar = tqdm(total=n_mine, desc=f"encode[{dist.rank}]" if dist.world > 1 else "encode", unit="img",
                       disable=not progress or n_mine == 0)
            for chunk in mine:
                _encode_shard(out, chunk, model, ckpt_hash, dim, dtype, use_masks, mask_generator, gen_dir,
                              batch_size, num_workers, device, bar)
            bar.close()
        except BaseException as exc:  # tell the other ranks before re-raising
            ok, err = False, exc
        if not dist.all_ok(ok):
            if err is not None:
                raise err
            raise RuntimeError("another rank failed while encoding; its shards so far are kept, run again to resume")

        report, err = None, None
        if dist.rank == 0:
            try:
                report = _merge(out, images, masks_dir, model, checkpoint, ckpt_hash, dim, dtype, man, current,
                                prune, exact_max, hnsw_max, progress, use_masks)
            except BaseException as exc:  # the other ranks must not wait for a merge that will not come
                err = exc
        if not dist.all_ok(err is None):
            if err is not None:
                raise err
            raise RuntimeError("rank 0 failed while merging the shards; they are kept, run again to resume")
        return report
    finally:
        dist.close()


def _encode_shard(out, chunk, model, ckpt_hash, dim, dtype, use_masks, mask_generator, gen_dir, batch_size,
                  num_workers, device, bar) -> None:
    ids = [it["id"] for it in chunk]
    name = "shard-" + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:20]
    shard_dir = out / "shards"
    if (shard_dir / (name + ".json")).exists():
        bar.update(len(chunk))
        return
    if use_masks and mask_generator is not None:
        need = [it for it in chunk if it.get("mask") is None]
        for i in range(0, len(need), 16):
            part = need[i:i + 16]
            pils = [load_pil(it["path"]) for it in part]
            for it, m in zip(part, mask_generator(pils)):
                dst = gen_dir / (it["id"] + "-segmask.png")
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(dst.name + ".tmp.png")
                m.convert("L").save(tmp)
                os.replace(tmp, dst)
                it["mask"] = str(dst.resolve())
                it["mask_mtime_ns"] = dst.stat().st_mtime_ns
    feats, rows, errors = encode_gallery(model, chunk, batch_size=batch_size, num_workers=num_workers,
                                         device=device, use_masks=use_masks, dtype=dtype, progress=bar)
    for r, msg in errors.items():
        log.warning("skipping %s: %s", chunk[r]["path"], msg)
    meta = {"checkpoint_hash": ckpt_hash, "dim": dim, "items": [chunk[r] for r in rows],
            "skipped": [dict(chunk[r], error=msg) for r, msg in sorted(errors.items())], "created": _now()}
    _atomic_save_npy(shard_dir / (name + ".npy"), feats)
    _atomic_write_json(shard_dir / (name + ".json"), meta)  # written last: marks the shard complete


def _merge(out: Path, images: Path, masks_dir, model, checkpoint, ckpt_hash, dim, dtype, man, current, prune,
           exact_max, hnsw_max, progress, use_masks) -> BuildReport:
    """Old rows + completed shards -> a new generation (rows sorted by id), FAISS when large, then the manifest.

    An image can have several records (the index, shards of a crashed run and of this run, the list of unreadable
    files); the one that describes the file as it is now (``current``: path, size, mtime) wins, whatever the order
    of the shard files."""
    from numpy.lib.format import open_memmap

    shards = _completed_shards(out / "shards", ckpt_hash, dim)
    present = set(current)
    if man is not None and not shards:
        gone = [it["id"] for it in _read_jsonl(out / man["items"]) if it["id"] not in present]
        if not (prune and gone) and man["search"]["kind"] == _ann.choose_kind(man["count"], exact_max, hnsw_max):
            log.info("index %s is up to date: %d images", out, man["count"])  # nothing to rewrite
            if gone:
                log.warning("%d indexed images are no longer in %s (e.g. %s); --prune removes them",
                            len(gone), images, gone[0])
            return BuildReport(str(out), man["count"], 0, man["count"], 0, man.get("skipped", []), man["search"])
    sources: list[np.ndarray] = []
    # every record of every image: (source, row, record); source -1 = an unreadable-file entry (no features),
    # 0 = the current index, 1.. = shards
    records: dict[str, list[tuple[int, int, dict]]] = {}
    if man is not None:
        sources.append(np.load(out / man["features"], mmap_mode="r"))
        for r, it in enumerate(_read_jsonl(out / man["items"])):
            records.setdefault(it["id"], []).append((0, r, it))
    else:
        sources.append(np.zeros((0, dim), dtype=dtype))
    for it in (man or {}).get("skipped", []):
        records.setdefault(it["id"], []).append((-1, -1, it))
    for sh in shards:
        sources.append(np.load(sh["_npy"], mmap_mode="r"))
        src = len(sources) - 1
        for r, it in enumerate(sh["items"]):
            records.setdefault(it["id"], []).append((src, r, it))
        for it in sh.get("skipped", []):
            records.setdefault(it["id"], []).append((-1, -1, it))

    def rank(cand, cur):
        # the file as it is now > features (when nothing matches, e.g. a file gone or changed again, the old
        # features stay, as before) > this run's work over the old index > the newer file
        src, _, rec = cand
        matches = cur is not None and _same_file(rec, cur, use_masks)
        return (matches, src >= 0, src != 0, int(rec.get("mtime_ns") or 0), src)

    by_id: dict[str, tuple[int, int, dict]] = {}
    skipped: dict[str, dict] = {}
    for image_id, cands in records.items():
        best = max(cands, key=lambda c: rank(c, current.get(image_id)))
        if best[0] < 0:
            skipped[image_id] = {k: best[2][k] for k in ("id", "path", "size", "mtime_ns", "error") if k in best[2]}
        else:
            by_id[image_id] = best
    gone = [i for i in by_id if i not in present]
    removed = 0
    if gone:
        if prune:
            for i in gone:
                del by_id[i]
            removed = len(gone)
            log.info("removed %d images that are no longer in %s", removed, images)
        else:
            log.warning("%d indexed images are no longer in %s (e.g. %s); --prune removes them",
                        len(gone), images, gone[0])
    for i in list(skipped):
        if i not in present:
            del skipped[i]
    encoded = sum(1 for src, _, _ in by_id.values() if src > 0)  # each image once, however many shards hold it
    reused = sum(1 for src, _, _ in by_id.values() if src == 0)

    ids = sorted(by_id)
    n = len(ids)
    if n == 0:
        raise DatasetError(f"no image under {images} could be read; nothing to index")
    gen = int((man or {}).get("generation", 0)) + 1
    feat_name, items_name = f"features-{gen:06d}.npy", f"items-{gen:06d}.jsonl"
    src_code = np.array([by_id[i][0] for i in ids], dtype=np.int64)
    src_row = np.array([by_id[i][1] for i in ids], dtype=np.int64)
    tmp = out / (feat_name + ".tmp")
    arr = open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, dim))
    block = 65536
    for s in range(0, n, block):
        e = min(n, s + block)
        codes = src_code[s:e]
        for c in np.unique(codes):
            sel = np.flatnonzero(codes == c)
            rows = src_row[s:e][sel]
            order = np.argsort(rows)  # read a memory-mapped source in increasing row order
            arr[s + sel[order]] = np.asarray(sources[c][rows[order]], dtype=dtype)
    arr.flush()
    del arr
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out / feat_name)
    _write_jsonl(out / items_name, (by_id[i][2] for i in ids))
    _atomic_write_json(out / "model_config.json", _config_json(model))

    feats = np.load(out / feat_name, mmap_mode="r")
    kind = _ann.choose_kind(n, exact_max, hnsw_max)
    search: dict[str, Any] = {"kind": kind, "exact_max": exact_max, "hnsw_max": hnsw_max}
    table = None
    if kind != "exact":
        engine, rep = _ann.build_faiss(feats, kind, progress=progress)
        faiss_name = f"faiss-{gen:06d}.index"
        engine.save(out / (faiss_name + ".tmp"))
        os.replace(out / (faiss_name + ".tmp"), out / faiss_name)
        search.update(rep.to_json(), file=faiss_name)
        table = rep.table()
        print(table, flush=True)

    manifest = {
        "format": FORMAT, "version": VERSION, "generation": gen, "count": n, "dim": dim, "dtype": dtype,
        "features": feat_name, "items": items_name, "model_config": "model_config.json",
        "checkpoint": {"path": str(Path(checkpoint).resolve()) if checkpoint is not None else None,
                       "hash": ckpt_hash},
        "needs_masks": bool(model.needs_masks), "target_masks": target_needs_mask(model),
        "query_masks": query_needs_mask(model), "images_root": str(images),
        "masks_dir": str(masks_dir) if masks_dir else None, "search": search,
        "skipped": sorted(skipped.values(), key=lambda s: s["id"]),
        "created": (man or {}).get("created", _now()), "updated": _now(),
        "offset_cir_version": _version(),
        # which runtime encoded this generation's new rows (informational: torch and onnx agree far below the
        # float16 storage step, so either searches an index of the same checkpoint)
        "runtime": getattr(model, "runtime_info", None) or {"runtime": "torch"},
    }
    _atomic_write_json(out / "manifest.json", manifest)  # commit point

    # ---- clean up what the new generation replaced
    keep = {feat_name, items_name, search.get("file")}
    for p in out.iterdir():
        if p.is_file() and re.match(r"(features|items|faiss)-\d{6}\.", p.name) and p.name not in keep:
            p.unlink()
        elif p.is_file() and p.name.endswith(".tmp"):
            p.unlink()
    for sh in shards:
        for p in (sh["_npy"], sh["_json"]):
            p.unlink(missing_ok=True)
    for p in (out / "shards").glob("*.tmp"):
        p.unlink(missing_ok=True)
    log.info("index %s: %d images (%d encoded now, %d kept, %d removed, %d unreadable), search: %s",
             out, n, encoded, reused, removed, len(skipped), kind)
    return BuildReport(str(out), n, encoded, reused, removed, manifest["skipped"], search, table)


def _version() -> str:
    try:
        from offset_cir import __version__

        return __version__
    except Exception:
        return "unknown"


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

    build = staticmethod(build_index)

    @classmethod
    def open(cls, path: str | os.PathLike, *, model=None, checkpoint=None, mask_generator=None, device=None,
             exact: bool = False, load_model: bool = True, verify_checkpoint: bool = True,
             runtime: str = "torch", onnx_dir=None) -> "Index":
        """Open the index at ``path``. The model is ``model``, else ``checkpoint``, else the checkpoint recorded in
        the manifest; its weights must hash to the manifest's hash. ``exact`` forces exact search. ``runtime``
        "onnx" encodes queries with onnxruntime (``offset_cir.export.runtime``): the export folder ``onnx_dir``,
        else the checkpoint exported on the fly."""
        path = Path(path).resolve()
        man = _read_manifest(path)
        if man is None:
            raise UserInputError(f"{path} is not an index (no manifest.json); build one with `offset index`")
        items = _read_jsonl(path / man["items"])
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
            h = checkpoint_hash(ckpt)
            want = self.manifest["checkpoint"]["hash"]
            if want.startswith("sha256:") and h != want:
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
        self.device = self.device or _default_device()
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
    def needs_masks(self) -> bool:
        return bool(self.manifest.get("needs_masks"))

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
        if query_needs_mask(model):
            if mask is None:
                if self.mask_generator is None:
                    raise MaskRequiredError(
                        "this model was trained with masks (needs_masks=True) and the reference image has none: "
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
        if query_needs_mask(self.model) and mask is None and self.mask_generator is None:
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
    as_spec = (lambda x: str(x) if isinstance(x, os.PathLike) else x)
    return MaskGenerator(captioner=as_spec(captioner), segmenter=as_spec(segmenter),
                         device=str(device or _default_device()))
