"""``offset doctor``: check a benchmark copy (docs/model.md#data).

Per split: triplet count, images and masks the split's protocol needs, which are missing (first 20 names and
the total), which images and masks do not open, which masks training would refuse for their size (the rule of
:mod:`offset_cir.data.mask_fit`, under the benchmark's ``clipseg_maps`` setting) and whether they are the release's
CLIPSeg maps (square, one size, not their images'), and counts that differ from the release's (``bench.expected``);
which split a protocol made for this benchmark needs is absent (a synthetic copy without ``test``; the caller names
the protocols); then a manifest (relative path, size, sha256 of every annotation file, image and mask found) so that
two people can compare their copies (:func:`compare_manifests`), saved beside the dataset or where asked, never over
another copy's manifest unless asked (:func:`save_manifest`).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from offset_cir.data.mask_fit import CLIPSEG_MAP_SIZE, is_clipseg_map, mask_size_problem
from offset_cir.errors import DatasetError, UserInputError
from offset_cir.hashing import bytes_sha256, file_sha256, tagged
from offset_cir.io import write_json

SHOW = 20


@dataclass
class SplitReport:
    split: str
    triplets: int = 0
    with_target: int = 0
    images_needed: int = 0
    images_found: int = 0
    masks_found: int = 0
    missing_images: list[str] = field(default_factory=list)
    missing_masks: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    unreadable_masks: list[str] = field(default_factory=list)
    # masks of another size than their image: (image id, mask size, image size); refused: those training refuses
    resized_masks: list[tuple[str, tuple[int, int], tuple[int, int]]] = field(default_factory=list)
    refused_masks: list[str] = field(default_factory=list)
    annotation_files: list[str] = field(default_factory=list)
    error: str | None = None
    wrong_counts: list[str] = field(default_factory=list)  # "<field>: found N, the release has M"

    def problems(self, masks: bool) -> bool:
        return bool(self.error or self.missing_images or self.unreadable or self.wrong_counts or (
            masks and (self.missing_masks or self.unreadable_masks or self.refused_masks)))


@dataclass
class Report:
    dataset: str
    root: str
    masks_required: bool
    splits: list[SplitReport]
    manifest: dict
    # split -> the protocols (made for this benchmark) that evaluate on it, for splits this copy lacks
    missing_splits: dict[str, list[str]] = field(default_factory=dict)
    clipseg_maps: str | None = None  # the benchmark's setting for the release's CLIPSeg maps

    @property
    def ok(self) -> bool:
        return (not any(s.problems(self.masks_required) for s in self.splits) and bool(self.splits)
                and not self.missing_splits)

    def lines(self) -> list[str]:
        out = [f"{self.dataset} at {self.root}"]
        if not self.splits:
            out.append("  no split found: the annotation files are missing")
        for split, protocols in self.missing_splits.items():
            names = ", ".join(protocols)
            out.append(f"  {split}: MISSING, needed by protocol{'s' if len(protocols) > 1 else ''} {names} "
                       f"(no annotation files for split {split!r} in this copy)")
        for s in self.splits:
            if s.error:
                out.append(f"  {s.split}: ERROR {s.error}")
                continue
            out.append(f"  {s.split}: {s.triplets} triplets ({s.with_target} with target), images "
                       f"{s.images_found}/{s.images_needed}, masks {s.masks_found}/{s.images_needed}")
            for label, names in (("missing images", s.missing_images), ("missing masks", s.missing_masks),
                                 ("unreadable images", s.unreadable), ("unreadable masks", s.unreadable_masks),
                                 ("masks training refuses for their size", s.refused_masks),
                                 ("counts unlike the release's", s.wrong_counts)):
                if names:
                    shown = ", ".join(names[:SHOW])
                    more = f" ... ({len(names)} in all)" if len(names) > SHOW else f" ({len(names)})"
                    out.append(f"    {label}: {shown}{more}")
        out += self.mask_size_lines()
        out.append("OK: everything the protocols need is present" if self.ok
                   else "PROBLEMS: something a protocol needs is missing or unreadable")
        return out

    def mask_size_lines(self) -> list[str]:
        """What the masks of another size than their image are, and which setting loads them (if one does)."""
        resized = [r for s in self.splits for r in s.resized_masks]
        if not resized:
            return []
        sizes = {m for _, m, _ in resized}
        (w, h), n = next(iter(sizes)), len(resized)
        first = f"{resized[0][0]}: mask {w}x{h}, image {resized[0][2][0]}x{resized[0][2][1]}"
        if len(sizes) > 1 or w != h:
            return [f"  masks: {n} have another size than their image ({len(sizes)} sizes; first {first}); a mask "
                    "must have its image's size: remake them with `offset masks`"]
        if (w, h) != (CLIPSEG_MAP_SIZE, CLIPSEG_MAP_SIZE) or not all(is_clipseg_map(m, i) for _, m, i in resized):
            return [f"  masks: {n} are {w}x{h} square maps of one size on images of other sizes (first {first}): "
                    f"CLIPSeg-like maps, but not at CLIPSeg's input size {CLIPSEG_MAP_SIZE}x{CLIPSEG_MAP_SIZE}, so no "
                    "setting loads them: remake them at their images' size with `offset masks`"]
        what = (f"  masks: {n} are {w}x{h} square maps on images of other sizes (first {first}): the release's "
                "CLIPSeg maps (CLIPSeg's sigmoid maps at its input size, as the release's segmentation download "
                "holds them)")
        if self.clipseg_maps:
            return [f"{what}; loaded with clipseg_maps={self.clipseg_maps}"]
        return [f"{what}; training refuses them as they are: load them with clipseg_maps=release (processed as the "
                "release does; the release presets set data.clipseg_maps: release) or clipseg_maps=aligned (each "
                "resized to its image first)"]


def _size(path: Path) -> tuple[int, int] | None:
    """The pixel size of an image file that opens and verifies, else None."""
    from offset_cir.images import ImageReadError, read_header

    try:
        return read_header(path, verify=True).size
    except ImageReadError:
        return None


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:
        return str(path)


def check(bench, splits: list[str] | None = None, masks: bool | None = None, open_images: bool = True,
          hashes: bool = True, progress: bool = True, protocols: dict[str, list[str]] | None = None) -> Report:
    """Inspect ``bench`` (see module doc). ``masks``: whether masks are required (default: ``bench.use_masks``);
    ``protocols``: split -> the protocols that evaluate on it (a split among them that this copy lacks is named)."""
    masks = bench.use_masks if masks is None else bool(masks)
    try:
        available = bench.splits()
    except DatasetError as exc:
        return Report(bench.name, str(bench.root), masks, [SplitReport("-", error=str(exc))], {})
    wanted = [bench.canonical_split(s) for s in splits] if splits else available
    missing_splits = {s: p for s, p in (protocols or {}).items()  # only the splits asked for, when asked
                      if s not in available and (not splits or s in wanted)}
    reports, files = [], {}
    for split in wanted:
        rep = SplitReport(split)
        reports.append(rep)
        try:
            for f in bench.annotation_files(split):
                rep.annotation_files.append(str(f))
                if Path(f).is_file():
                    files[Path(f)] = "annotation"
            queries = bench.queries(split)
            ids = bench.split_images(split)
        except DatasetError as exc:
            rep.error = str(exc)
            continue
        rep.triplets = len(queries)
        rep.with_target = sum(q.target is not None for q in queries)
        rep.images_needed = len(ids)
        it = ids
        if progress:
            from tqdm import tqdm

            it = tqdm(ids, desc=f"{bench.name} {split}", unit="img", leave=False)
        for image_id in it:
            _check_image(bench, image_id, rep, files, open_images)
        rep.wrong_counts = [f"{k}: found {getattr(rep, k):,}, the release has {n:,}"
                            for k, n in getattr(bench, "expected", {}).get(split, {}).items() if getattr(rep, k) != n]
    manifest = {
        "dataset": bench.name,
        "root": str(bench.root),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": [{"path": _rel(p, bench.root), "kind": kind, "size": p.stat().st_size,
                   **({"sha256": file_sha256(p)} if hashes else {})}
                  for p, kind in sorted(files.items(), key=lambda kv: str(kv[0]))],
    }
    manifest["hash"] = manifest_hash(manifest)
    return Report(bench.name, str(bench.root), masks, reports, manifest, missing_splits,
                  getattr(bench, "clipseg_maps", None))


def _check_image(bench, image_id: str, rep: SplitReport, files: dict, open_images: bool) -> None:
    """One image and its mask, as training will load them: present, decodable, the mask's size acceptable."""
    try:
        img = Path(bench.image_path(image_id))
    except DatasetError:
        rep.missing_images.append(image_id)
        return
    size = None
    if img.is_file():
        rep.images_found += 1
        files[img] = "image"
        if open_images and (size := _size(img)) is None:
            rep.unreadable.append(image_id)
    else:
        rep.missing_images.append(image_id)
    mask = Path(bench.mask_path(image_id))
    if not mask.is_file():
        rep.missing_masks.append(image_id)
        return
    rep.masks_found += 1
    files[mask] = "mask"
    if not open_images:
        return
    mask_size = _size(mask)
    if mask_size is None:
        rep.unreadable_masks.append(image_id)
    elif size is not None and mask_size != size:
        rep.resized_masks.append((image_id, mask_size, size))
        if mask_size_problem(mask_size, size, getattr(bench, "clipseg_maps", None)):
            rep.refused_masks.append(image_id)


def manifest_hash(manifest: dict) -> str:
    """``sha256:<hex>`` of a manifest's file list (path, kind, size, sha256 of every file; not its date or
    location): two copies with equal files have the same hash, so a result can name the copy it was scored on."""
    files = sorted(({k: f.get(k) for k in ("path", "kind", "size", "sha256") if k in f}
                    for f in manifest.get("files", [])), key=lambda f: str(f.get("path")))
    blob = json.dumps({"dataset": manifest.get("dataset"), "files": files}, sort_keys=True, separators=(",", ":"))
    return tagged(bytes_sha256(blob.encode("utf-8")))


def default_manifest_path(bench) -> Path:
    """Where a benchmark copy's manifest goes unless asked otherwise: beside its folder, ``<folder>-manifest.json``
    (``data/cirr`` -> ``data/cirr-manifest.json``)."""
    root = Path(bench.root).resolve()
    return root.parent / f"{root.name}-manifest.json"


def save_manifest(manifest: dict, path, overwrite: bool = False) -> str:
    """Write ``manifest`` to ``path`` atomically; returns "written" or "unchanged" (the file there describes the
    same files: nothing to write). A file there that is not this copy's manifest is replaced only with
    ``overwrite``; otherwise a UserInputError says so and nothing is written."""
    path = Path(path)
    if path.exists():
        try:
            same = manifest_hash(json.loads(path.read_text(encoding="utf-8"))) == manifest_hash(manifest)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
            same = False
        if same:
            return "unchanged"
        if not overwrite:
            raise UserInputError(f"manifest {path} exists and describes other files (another copy, or this one "
                                 "before a change); give --overwrite to replace it, or --manifest FILE to write "
                                 "elsewhere")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, manifest, indent=1)
    return "written"


def compare_manifests(mine: dict, theirs: dict) -> dict[str, list[str]]:
    """Paths only in ``mine``, only in ``theirs``, and present in both with different size or sha256."""
    a = {f["path"]: f for f in mine.get("files", [])}
    b = {f["path"]: f for f in theirs.get("files", [])}
    differ = [p for p in sorted(a.keys() & b.keys())
              if a[p].get("size") != b[p].get("size") or a[p].get("sha256") != b[p].get("sha256")]
    return {"only_here": sorted(a.keys() - b.keys()), "only_there": sorted(b.keys() - a.keys()), "differ": differ}
