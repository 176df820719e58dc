"""Building and updating a search index: scan a gallery folder, encode new images in resumable shards, merge them.

The folder this writes is described in :mod:`offset_cir.search.index` (which opens and searches it); which files of
the images folder are images and where their masks are is :mod:`offset_cir.masks.layout`'s rule. Building
encodes only images that are not in the index yet (or whose file changed); work is written in shards
(``shards/shard-<hash>.npy`` + ``.json``, the ``.json`` marks completion), so a killed run resumes where it
stopped. Under ``torchrun`` every rank encodes its share of the shards and rank 0 merges them into a new
generation; ``manifest.json`` is written last (the commit point). Every file is written atomically
(:mod:`offset_cir.io`).
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
from typing import Any

import numpy as np

from offset_cir import io
from offset_cir.errors import CheckpointError, DatasetError, UserInputError
from offset_cir.masks.layout import IMAGE_EXTENSIONS, find_mask, scan_images
from offset_cir.search import ann as _ann
from offset_cir.search.index import (
    FORMAT,
    HASH_PREFIX,
    VERSION,
    load_pil,
    model_state_hash,
    read_jsonl,
    read_manifest,
    uses_query_mask,
    uses_target_mask,
)

log = logging.getLogger(__name__)

__all__ = ["BuildReport", "build_index", "encode_gallery", "scan_images"]

_JSON = {"indent": 1, "sort_keys": True}  # the index's JSON files (manifest, model config, shard markers)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _config_json(model) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg):
        return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    if isinstance(cfg, dict):
        return json.loads(json.dumps(cfg, default=str))
    return {"repr": repr(cfg)}


def _version() -> str:
    try:
        from offset_cir import __version__

        return __version__
    except Exception:
        return "unknown"


# ----------------------------------------------------------------------------------------------- encoding


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
    import torch

    from offset_cir.device import choose_device
    from offset_cir.distributed import all_ok, barrier, close_distributed, init_distributed
    from offset_cir.model.checkpoint import checkpoint_hash

    # nccl on a CUDA machine, gloo otherwise; torch's default collective timeout (a merge is short)
    dist = init_distributed("cuda" if torch.cuda.is_available() else "cpu", enabled=distributed, timeout=None)
    try:
        if model is None:
            if checkpoint is None:
                raise UserInputError("build_index needs a checkpoint or a model")
            import offset_cir

            log.info("loading checkpoint %s ...", checkpoint)
            model = offset_cir.load_checkpoint(checkpoint)
        ckpt_hash = HASH_PREFIX + checkpoint_hash(checkpoint) if checkpoint is not None else model_state_hash(model)
        device = choose_device(device)
        model = model.to(device) if hasattr(model, "to") else model
        if hasattr(model, "eval"):
            model.eval()
        dim = int(model.embed_dim)
        use_masks = uses_target_mask(model)

        man = read_manifest(out)
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
        barrier(dist)

        # ---- what is there, what must be encoded
        scanned = scan_images(images, exclude=[out])
        if not scanned:
            raise DatasetError(f"no images under {images} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        old_items = read_jsonl(out / man["items"]) if man else []
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
            m = find_mask(path, images, masks_dir, generated=gen_dir / (image_id + "-segmask.png"))
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
        barrier(dist)  # every rank has listed the shards before any rank writes one

        # ---- masks: stored ones, else the mask pipeline, else a clear error
        missing = [item for item in todo if use_masks and item["mask"] is None]
        if missing and mask_generator is None:
            first = ", ".join(Path(it["path"]).name for it in missing[:3])
            raise DatasetError(
                f"this model encodes gallery images with masks (use_masks=True) but {len(missing)} of "
                f"{len(todo)} images have no mask (e.g. {first}); expected <stem>-segmask.png beside each "
                f"image or in --masks DIR, or configure "
                f"the mask pipeline (--captioner/--segmenter, `offset masks`) to make them")

        # ---- encode my share, one shard per chunk
        chunks = [todo[i:i + shard_size] for i in range(0, len(todo), shard_size)]
        mine = [c for j, c in enumerate(chunks) if j % dist.world_size == dist.rank]
        n_mine = sum(len(c) for c in mine)
        if dist.rank == 0:
            log.info("index %s: %d images, %d already indexed, %d to encode (%d shards, %d process(es))",
                     out, len(scanned), len(scanned) - len(todo), len(todo), len(chunks), dist.world_size)
        ok = True
        err: BaseException | None = None
        try:
            bar = tqdm(total=n_mine, desc=f"encode[{dist.rank}]" if dist.world_size > 1 else "encode", unit="img",
                       disable=not progress or n_mine == 0)
            for chunk in mine:
                _encode_shard(out, chunk, model, ckpt_hash, dim, dtype, use_masks, mask_generator, gen_dir,
                              batch_size, num_workers, device, bar)
            bar.close()
        except BaseException as exc:  # tell the other ranks before re-raising
            ok, err = False, exc
        if not all_ok(ok, dist):
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
        if not all_ok(err is None, dist):
            if err is not None:
                raise err
            raise RuntimeError("rank 0 failed while merging the shards; they are kept, run again to resume")
        return report
    finally:
        close_distributed(dist)


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
                with io.atomic_path(dst) as tmp:
                    m.convert("L").save(tmp, format="PNG")
                it["mask"] = str(dst.resolve())
                it["mask_mtime_ns"] = dst.stat().st_mtime_ns
    feats, rows, errors = encode_gallery(model, chunk, batch_size=batch_size, num_workers=num_workers,
                                         device=device, use_masks=use_masks, dtype=dtype, progress=bar)
    for r, msg in errors.items():
        log.warning("skipping %s: %s", chunk[r]["path"], msg)
    meta = {"checkpoint_hash": ckpt_hash, "dim": dim, "items": [chunk[r] for r in rows],
            "skipped": [dict(chunk[r], error=msg) for r, msg in sorted(errors.items())], "created": _now()}
    io.save_npy(shard_dir / (name + ".npy"), feats)
    io.write_json(shard_dir / (name + ".json"), meta, **_JSON)  # written last: marks the shard complete


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
        gone = [it["id"] for it in read_jsonl(out / man["items"]) if it["id"] not in present]
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
        for r, it in enumerate(read_jsonl(out / man["items"])):
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
    with io.atomic_path(out / feat_name) as tmp:
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
    io.write_jsonl(out / items_name, (by_id[i][2] for i in ids), sort_keys=True)
    io.write_json(out / "model_config.json", _config_json(model), **_JSON)

    feats = np.load(out / feat_name, mmap_mode="r")
    kind = _ann.choose_kind(n, exact_max, hnsw_max)
    search: dict[str, Any] = {"kind": kind, "exact_max": exact_max, "hnsw_max": hnsw_max}
    table = None
    if kind != "exact":
        engine, rep = _ann.build_faiss(feats, kind, progress=progress)
        faiss_name = f"faiss-{gen:06d}.index"
        with io.atomic_path(out / faiss_name) as tmp:
            engine.save(tmp)
        search.update(rep.to_json(), file=faiss_name)
        table = rep.table()  # the caller shows it (`offset index` prints it)
        log.debug("index %s: %s search tuned against exact search\n%s", out, kind, table)

    manifest = {
        "format": FORMAT, "version": VERSION, "generation": gen, "count": n, "dim": dim, "dtype": dtype,
        "features": feat_name, "items": items_name, "model_config": "model_config.json",
        "checkpoint": {"path": str(Path(checkpoint).resolve()) if checkpoint is not None else None,
                       "hash": ckpt_hash},
        # "needs_masks": the manifest's key since its first version (Index.uses_masks reads it)
        "needs_masks": bool(model.uses_masks), "target_masks": uses_target_mask(model),
        "query_masks": uses_query_mask(model), "images_root": str(images),
        "masks_dir": str(masks_dir) if masks_dir else None, "search": search,
        "skipped": sorted(skipped.values(), key=lambda s: s["id"]),
        "created": (man or {}).get("created", _now()), "updated": _now(),
        "offset_cir_version": _version(),
        # which runtime encoded this generation's new rows (informational: torch and onnx agree far below the
        # float16 storage step, so either searches an index of the same checkpoint)
        "runtime": getattr(model, "runtime_info", None) or {"runtime": "torch"},
    }
    io.write_json(out / "manifest.json", manifest, **_JSON)  # commit point

    # ---- clean up what the new generation replaced
    keep = {feat_name, items_name, search.get("file")}
    for p in out.iterdir():
        if p.is_file() and re.match(r"(features|items|faiss)-\d{6}\.", p.name) and p.name not in keep:
            p.unlink()
        elif p.is_file() and _is_leftover(p):
            p.unlink()
    for sh in shards:
        for p in (sh["_npy"], sh["_json"]):
            p.unlink(missing_ok=True)
    for p in (out / "shards").iterdir():
        if p.is_file() and _is_leftover(p):
            p.unlink(missing_ok=True)
    log.info("index %s: %d images (%d encoded now, %d kept, %d removed, %d unreadable), search: %s",
             out, n, encoded, reused, removed, len(skipped), kind)
    return BuildReport(str(out), n, encoded, reused, removed, manifest["skipped"], search, table)


def _is_leftover(path: Path) -> bool:
    """A temporary file of an interrupted write: ``offset_cir.io``'s, or the ``.tmp`` of older versions."""
    return path.name.endswith(".tmp") or io.is_temporary(path)
