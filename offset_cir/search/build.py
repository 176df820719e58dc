"""Building and updating a search index: scan a gallery folder, encode new images in resumable shards, merge them.

The folder this writes is :mod:`offset_cir.search.format`'s; which files of the images folder are images and where
their masks are is :mod:`offset_cir.masks.layout`'s rule. Building encodes only images that are not in the index
yet (or whose file changed); work is written in shards (the marker ``.json`` written last), so a killed run
resumes where it stopped. Under ``torchrun`` every rank encodes its share of the shards and rank 0 merges them
into a new generation; the manifest is written last (the commit point).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from offset_cir import io
from offset_cir.errors import DatasetError, UserInputError
from offset_cir.masks.layout import IMAGE_EXTENSIONS, find_mask, scan_images
from offset_cir.search import ann
from offset_cir.search import format as fmt
from offset_cir.search.gallery import encode_gallery, make_missing_masks
from offset_cir.search.inputs import uses_query_mask, uses_target_mask

log = logging.getLogger(__name__)

__all__ = ["BuildReport", "IndexBuilder", "build_index"]


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


@dataclasses.dataclass
class Scan:
    """The images folder as it is now: every image's record (``current``) and those that must be encoded."""

    current: dict[str, dict]
    todo: list[dict]


def _version() -> str:
    try:
        from offset_cir import __version__

        return __version__
    except Exception:
        return "unknown"


def _agree(dist, work: Callable[[], Any], failed_elsewhere: str, *, here: bool = True):
    """Run ``work`` (on this rank when ``here``) and stop every rank when one failed: the failing rank re-raises
    its error, the others a RuntimeError saying ``failed_elsewhere`` (nobody waits for work that will not come)."""
    from offset_cir.distributed import all_ok

    result, err = None, None
    if here:
        try:
            result = work()
        except BaseException as exc:  # tell the other ranks before re-raising
            err = exc
    if not all_ok(err is None, dist):
        if err is not None:
            raise err
        raise RuntimeError(failed_elsewhere)
    return result


@dataclasses.dataclass
class IndexBuilder:
    """One build or update of the index at ``out`` from the images under ``images`` (see the module docstring).

    Made by :meth:`prepare` (which loads the model and checks the existing index); :meth:`run` scans, encodes
    this rank's shards and, on rank 0, merges them. The fields are the settings of :func:`build_index`."""

    #: the index folder (created or updated)
    out: Path
    #: the images folder it covers (searched recursively)
    images: Path
    #: the encoder (on ``device``, in eval mode)
    model: Any
    #: the features' source as the manifest records it (``sha256:`` checkpoint hash or ``state:`` hash)
    identity: str
    #: this process's place among the ranks (``offset_cir.distributed.DistInfo``)
    dist: Any
    #: the checkpoint the model came from (recorded in the manifest), None for an in-memory model
    checkpoint: Any = None
    #: a folder of masks besides those beside the images
    masks_dir: Path | None = None
    #: the mask pipeline, for images without a mask (None: such images are an error when masks are used)
    mask_generator: Callable | None = None
    #: images per encoder call
    batch_size: int = 32
    #: image decoding processes
    num_workers: int = 0
    #: images per resumable shard
    shard_size: int = 1024
    #: feature storage: float16 or float32
    dtype: str = "float16"
    #: galleries below this size are searched exactly
    exact_max: int = ann.EXACT_MAX
    #: galleries below this size use HNSW, larger ones IVF
    hnsw_max: int = ann.HNSW_MAX
    #: drop indexed images that left the folder
    prune: bool = False
    #: draw a progress bar
    progress: bool = True
    #: the torch device the model runs on
    device: Any = None
    #: encode at most this many new images in this run
    limit: int | None = None
    #: the manifest of the index as it was before this run (None for a new index)
    manifest: dict | None = None

    @property
    def dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def use_masks(self) -> bool:
        """Whether gallery images are encoded with masks."""
        return uses_target_mask(self.model)

    @property
    def generated_masks(self) -> Path:
        return self.out / fmt.GENERATED_MASKS_DIR

    @classmethod
    def prepare(cls, out: Path, images: Path, *, model=None, checkpoint=None, dtype: str | None = None, device=None,
                dist, **settings) -> "IndexBuilder":
        """Load the model (``checkpoint`` when no ``model``), identify it, and check that the index at ``out``, if
        there is one, was built with the same checkpoint from the same images folder."""
        from offset_cir.device import choose_device
        from offset_cir.model.checkpoint import require_same_checkpoint

        if model is None:
            if checkpoint is None:
                raise UserInputError("build_index needs a checkpoint or a model")
            import offset_cir

            log.info("loading checkpoint %s ...", checkpoint)
            model = offset_cir.load_checkpoint(checkpoint)
        identity = fmt.model_identity(model, checkpoint)
        device = choose_device(device)
        model = model.to(device) if hasattr(model, "to") else model
        if hasattr(model, "eval"):
            model.eval()
        man = fmt.read_index_manifest(out)
        dtype = dtype or (man or {}).get("dtype", "float16")  # an update keeps the index's storage type
        if dtype not in ("float16", "float32"):
            raise UserInputError(f"dtype must be float16 or float32, got {dtype!r}")
        if man is not None:
            require_same_checkpoint(
                identity, man["checkpoint"]["hash"], recorded_in=fmt.index_source(out, man),
                found_in=fmt.model_source(model, checkpoint),
                why=f"features of two models cannot be mixed (the index's checkpoint: "
                    f"{man['checkpoint'].get('path')}); build a new index (another --out)")
            if Path(man["images_root"]) != images:
                raise UserInputError(
                    f"index {out} indexes {man['images_root']}, not {images}: an index covers one images folder")
        return cls(out, images, model, identity, dist, checkpoint=checkpoint, dtype=dtype, device=device,
                   manifest=man, **settings)

    # ------------------------------------------------------------------------------------------- the run

    def run(self) -> BuildReport | None:
        """Scan, encode this rank's shards, merge on rank 0: the report on rank 0, None on other ranks."""
        from offset_cir.distributed import barrier

        if self.dist.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / fmt.SHARDS_DIR).mkdir(exist_ok=True)
        barrier(self.dist)
        scan = self.scan()
        barrier(self.dist)  # every rank has listed the shards before any rank writes one
        self.check_masks(scan.todo)
        _agree(self.dist, lambda: self.encode_shards(scan.todo),
               "another rank failed while encoding; its shards so far are kept, run again to resume")
        return _agree(self.dist, lambda: self.merge_shards(scan.current),
                      "rank 0 failed while merging the shards; they are kept, run again to resume",
                      here=self.dist.rank == 0)

    def scan(self) -> Scan:
        """Every image under ``images`` as it is now, and those no record describes (new or changed files;
        unreadable files are retried only when they change), at most ``limit`` of them."""
        scanned = scan_images(self.images, exclude=[self.out])
        if not scanned:
            raise DatasetError(f"no images under {self.images} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        man = self.manifest
        known: dict[str, list[dict]] = {}  # an image can have several records (shards of two runs, the index)
        for sh in fmt.completed_shards(self.out, self.identity, self.dim):
            for it in sh.items + sh.skipped:
                known.setdefault(it["id"], []).append(it)
        for it in (fmt.read_items(self.out, man) if man else []) + (man or {}).get("skipped", []):
            known.setdefault(it["id"], []).append(it)
        current: dict[str, dict] = {}
        todo: list[dict] = []
        for image_id, path in scanned:
            mask = find_mask(path, self.images, self.masks_dir,
                             generated=self.generated_masks / (image_id + "-segmask.png"))
            current[image_id] = item = fmt.file_record(image_id, path, mask)
            if not any(fmt.same_file(r, item, self.use_masks) for r in known.get(image_id, [])):
                todo.append(item)
        if self.limit is not None:
            todo = todo[:max(0, int(self.limit))]
        if self.dist.rank == 0:
            log.info("index %s: %d images, %d already indexed, %d to encode (%d shards, %d process(es))",
                     self.out, len(scanned), len(scanned) - len(todo), len(todo), -(-len(todo) // self.shard_size),
                     self.dist.world_size)
        return Scan(current, todo)

    def check_masks(self, todo: list[dict]) -> None:
        """Masks: stored ones, else the mask pipeline, else a clear error naming images that lack one."""
        missing = [item for item in todo if self.use_masks and item["mask"] is None]
        if missing and self.mask_generator is None:
            first = ", ".join(Path(it["path"]).name for it in missing[:3])
            raise DatasetError(
                f"this model encodes gallery images with masks (use_masks=True) but {len(missing)} of "
                f"{len(todo)} images have no mask (e.g. {first}); expected <stem>-segmask.png beside each "
                f"image or in --masks DIR, or configure "
                f"the mask pipeline (--captioner/--segmenter, `offset masks`) to make them")

    def encode_shards(self, todo: list[dict]) -> None:
        """Encode this rank's share of ``todo``, one shard per ``shard_size`` images (shard j on rank j mod world
        size); a shard already completed by an earlier run is skipped."""
        from tqdm.auto import tqdm

        chunks = [todo[i:i + self.shard_size] for i in range(0, len(todo), self.shard_size)]
        mine = [c for j, c in enumerate(chunks) if j % self.dist.world_size == self.dist.rank]
        n_mine = sum(len(c) for c in mine)
        desc = f"encode[{self.dist.rank}]" if self.dist.world_size > 1 else "encode"
        with tqdm(total=n_mine, desc=desc, unit="img", disable=not self.progress or n_mine == 0) as bar:
            for chunk in mine:
                self.encode_shard(chunk, bar)

    def encode_shard(self, chunk: list[dict], bar) -> None:
        name = fmt.shard_name([it["id"] for it in chunk])
        if fmt.shard_done(self.out, name):
            bar.update(len(chunk))
            return
        if self.use_masks and self.mask_generator is not None:
            make_missing_masks(chunk, self.mask_generator, self.generated_masks)
        feats, rows, errors = encode_gallery(self.model, chunk, batch_size=self.batch_size,
                                             num_workers=self.num_workers, device=self.device,
                                             use_masks=self.use_masks, dtype=self.dtype, progress=bar)
        for r, msg in errors.items():
            log.warning("skipping %s: %s", chunk[r]["path"], msg)
        fmt.write_shard(self.out, name, feats, self.identity, self.dim, [chunk[r] for r in rows],
                        [dict(chunk[r], error=msg) for r, msg in sorted(errors.items())])

    # ------------------------------------------------------------------------------------------- the merge

    def merge_shards(self, current: dict[str, dict]) -> BuildReport:
        """Old rows + completed shards -> a new generation (rows sorted by id), FAISS when large, then the
        manifest; the files it replaces and the merged shards are removed."""
        shards = fmt.completed_shards(self.out, self.identity, self.dim)
        if self.manifest is not None and not shards and self._up_to_date(current):
            man = self._record_baseline(self.manifest)
            return BuildReport(str(self.out), man["count"], 0, man["count"], 0, man.get("skipped", []),
                               man["search"])
        sources, records = self._records(shards)
        by_id, skipped = self._choose(records, current)
        removed = self._drop_gone(by_id, skipped, current)
        ids = sorted(by_id)
        if not ids:
            raise DatasetError(f"no image under {self.images} could be read; nothing to index")
        gen = fmt.Generation.after(self.manifest)
        fmt.write_features(self.out / gen.features, sources, np.array([by_id[i][0] for i in ids], dtype=np.int64),
                           np.array([by_id[i][1] for i in ids], dtype=np.int64), self.dtype, self.dim)
        fmt.write_items(self.out, gen.items, (by_id[i][2] for i in ids))
        fmt.write_model_config(self.out, self.model)
        search, table = self._search_engine(gen)
        manifest = self._manifest(gen, len(ids), search, sorted(skipped.values(), key=lambda s: s["id"]))
        fmt.write_manifest(self.out, manifest)  # the commit point
        fmt.remove_replaced(self.out, {gen.features, gen.items, search.get("file")})
        for sh in shards:
            sh.remove()
        fmt.remove_shard_leftovers(self.out)
        encoded = sum(1 for src, _, _ in by_id.values() if src > 0)  # each image once, however many shards hold it
        reused = sum(1 for src, _, _ in by_id.values() if src == 0)
        log.info("index %s: %d images (%d encoded now, %d kept, %d removed, %d unreadable), search: %s",
                 self.out, len(ids), encoded, reused, removed, len(skipped), search["kind"])
        return BuildReport(str(self.out), len(ids), encoded, reused, removed, manifest["skipped"], search, table)

    def _baseline_record(self) -> dict | None:
        """The manifest's ``baseline``: a training-free baseline's spec (the query mode it was built with included),
        None for a trained model."""
        spec = getattr(self.model, "spec", None)
        return spec.to_json() if spec is not None else None

    def _record_baseline(self, man: dict) -> dict:
        """An up-to-date index's manifest, rewritten when this run names another baseline query mode (the features
        are the same for every mode)."""
        if man.get("baseline") == self._baseline_record():
            return man
        man = dict(man, baseline=self._baseline_record(), updated=fmt.now())
        fmt.write_manifest(self.out, man)
        log.info("index %s: searches use baseline %s by default", self.out, man["baseline"]["mode"])
        return man

    def _warn_gone(self, gone: list[str]) -> None:
        log.warning("%d indexed images are no longer in %s (e.g. %s); --prune removes them", len(gone),
                    self.images, gone[0])

    def _up_to_date(self, current: dict[str, dict]) -> bool:
        """No shard to merge: the index stands as it is unless images left and ``prune`` asks to drop them, or
        its size now calls for another search engine."""
        man = self.manifest
        gone = [it["id"] for it in fmt.read_items(self.out, man) if it["id"] not in current]
        if (self.prune and gone) or man["search"]["kind"] != ann.choose_kind(man["count"], self.exact_max,
                                                                              self.hnsw_max):
            return False
        log.info("index %s is up to date: %d images", self.out, man["count"])  # nothing to rewrite
        if gone:
            self._warn_gone(gone)
        return True

    def _records(self, shards: list[fmt.Shard]):
        """Feature sources (0 = the current index, 1.. = shards) and every record of every image as
        ``(source, row, record)``; source -1 is an unreadable-file entry (no features)."""
        man = self.manifest
        sources: list[np.ndarray] = []
        records: dict[str, list[tuple[int, int, dict]]] = {}
        if man is not None:
            sources.append(fmt.load_features(self.out, man))
            for r, it in enumerate(fmt.read_items(self.out, man)):
                records.setdefault(it["id"], []).append((0, r, it))
        else:
            sources.append(np.zeros((0, self.dim), dtype=self.dtype))
        unreadable = list((man or {}).get("skipped", []))
        for sh in shards:
            sources.append(sh.features())
            for r, it in enumerate(sh.items):
                records.setdefault(it["id"], []).append((len(sources) - 1, r, it))
            unreadable += sh.skipped
        for it in unreadable:
            records.setdefault(it["id"], []).append((-1, -1, it))
        return sources, records

    def _choose(self, records, current):
        """One record per image: the one that describes the file as it is now (``current``: path, size, mtime)
        wins, whatever the order of the shard files; then features over none (a file gone or changed again keeps
        its old features), this run's work over the old index, the newer file. Returns (with features by id,
        unreadable entries by id)."""
        def rank(cand, cur):
            src, _, rec = cand
            matches = cur is not None and fmt.same_file(rec, cur, self.use_masks)
            return (matches, src >= 0, src != 0, int(rec.get("mtime_ns") or 0), src)

        by_id: dict[str, tuple[int, int, dict]] = {}
        skipped: dict[str, dict] = {}
        for image_id, cands in records.items():
            best = max(cands, key=lambda c: rank(c, current.get(image_id)))
            if best[0] < 0:
                skipped[image_id] = fmt.skipped_record(best[2])
            else:
                by_id[image_id] = best
        return by_id, skipped

    def _drop_gone(self, by_id: dict, skipped: dict, current: dict) -> int:
        """Forget unreadable entries of files that left; drop indexed ones too when ``prune`` (else warn).
        Returns how many indexed images were removed."""
        for i in [i for i in skipped if i not in current]:
            del skipped[i]
        gone = [i for i in by_id if i not in current]
        if not gone:
            return 0
        if not self.prune:
            self._warn_gone(gone)
            return 0
        for i in gone:
            del by_id[i]
        log.info("removed %d images that are no longer in %s", len(gone), self.images)
        return len(gone)

    def _search_engine(self, gen: fmt.Generation) -> tuple[dict, str | None]:
        """The manifest's ``search`` entry for the new features, with a tuned FAISS index when the gallery is
        large, and the tuning table (the caller shows it: `offset index` prints it)."""
        feats = np.load(self.out / gen.features, mmap_mode="r")
        kind = ann.choose_kind(feats.shape[0], self.exact_max, self.hnsw_max)
        search: dict[str, Any] = {"kind": kind, "exact_max": self.exact_max, "hnsw_max": self.hnsw_max}
        if kind == "exact":
            return search, None
        engine, rep = ann.build_faiss(feats, kind, progress=self.progress)
        with io.atomic_path(self.out / gen.faiss) as tmp:
            engine.save(tmp)
        search.update(rep.to_json(), file=gen.faiss)
        table = rep.table()
        log.debug("index %s: %s search tuned against exact search\n%s", self.out, kind, table)
        return search, table

    def _manifest(self, gen: fmt.Generation, count: int, search: dict, skipped: list[dict]) -> dict:
        man, model = self.manifest or {}, self.model
        return {
            "format": fmt.FORMAT, "version": fmt.VERSION, "generation": gen.number, "count": count,
            "dim": self.dim, "dtype": self.dtype, "features": gen.features, "items": gen.items,
            "model_config": fmt.MODEL_CONFIG_NAME,
            "checkpoint": {"path": str(Path(self.checkpoint).resolve()) if self.checkpoint is not None else None,
                           "hash": self.identity},
            # a training-free baseline's backbone and weights, and the query mode it was built with (null: a
            # trained model)
            "baseline": self._baseline_record(),
            "uses_masks": bool(model.uses_masks), "target_masks": uses_target_mask(model),
            "query_masks": uses_query_mask(model), "images_root": str(self.images),
            "masks_dir": str(self.masks_dir) if self.masks_dir else None, "search": search, "skipped": skipped,
            "created": man.get("created", fmt.now()), "updated": fmt.now(), "offset_cir_version": _version(),
            # which runtime encoded this generation's new rows (informational: torch and onnx agree far below the
            # float16 storage step, so either searches an index of the same checkpoint)
            "runtime": getattr(model, "runtime_info", None) or {"runtime": "torch"},
        }


def build_index(out: str | os.PathLike, images: str | os.PathLike, *, model=None, checkpoint=None,
                masks_dir=None, mask_generator=None, batch_size: int = 32, num_workers: int = 0,
                shard_size: int = 1024, dtype: str | None = None, exact_max: int = ann.EXACT_MAX,
                hnsw_max: int = ann.HNSW_MAX, prune: bool = False, progress: bool = True, device=None,
                distributed: bool | None = None, limit: int | None = None) -> BuildReport | None:
    """Create or update the index at ``out`` from the images under ``images`` (see the module docstring).

    Give ``checkpoint`` (a path for ``offset_cir.load_checkpoint``) or an in-memory ``model`` (or both: the model
    then must be the checkpoint's). Only images that are new or changed are encoded. ``limit`` stops after that
    many new images (the rest are added by the next call). ``dtype`` (float16 or float32) defaults to the existing
    index's, else float16. Returns the report on rank 0, None on other ranks.
    """
    out = Path(out).resolve()
    images = Path(images).resolve()
    if not images.is_dir():  # before loading a model or creating anything
        raise DatasetError(f"images folder {images} does not exist or is not a folder")
    masks_dir = Path(masks_dir).resolve() if masks_dir else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise DatasetError(f"masks folder {masks_dir} does not exist")
    import torch

    from offset_cir.distributed import close_distributed, init_distributed

    # nccl on a CUDA machine, gloo otherwise; torch's default collective timeout (a merge is short)
    dist = init_distributed("cuda" if torch.cuda.is_available() else "cpu", enabled=distributed, timeout=None)
    try:
        builder = IndexBuilder.prepare(
            out, images, model=model, checkpoint=checkpoint, dtype=dtype, device=device, dist=dist,
            masks_dir=masks_dir, mask_generator=mask_generator, batch_size=batch_size, num_workers=num_workers,
            shard_size=shard_size, exact_max=exact_max, hnsw_max=hnsw_max, prune=prune, progress=progress,
            limit=limit)
        return builder.run()
    finally:
        close_distributed(dist)
