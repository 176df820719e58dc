"""``offset doctor``: check a benchmark copy (SPEC section 6).

Per split: triplet count, images and masks the split's protocol needs, which are missing (first 20 names and
the total), which images do not open, and counts that differ from the release's (``bench.expected``); which
split a protocol made for this benchmark needs is absent (a synthetic copy without ``test``; the caller names the
protocols); then a manifest (relative path, size, sha256 of every annotation
file, image and mask found) so that two people can compare their copies (:func:`compare_manifests`).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from offset_cir.errors import DatasetError
from offset_cir.hashing import file_sha256

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
    annotation_files: list[str] = field(default_factory=list)
    error: str | None = None
    wrong_counts: list[str] = field(default_factory=list)  # "<field>: found N, the release has M"

    def problems(self, masks: bool) -> bool:
        return bool(self.error or self.missing_images or self.unreadable or (masks and self.missing_masks)
                    or self.wrong_counts)


@dataclass
class Report:
    dataset: str
    root: str
    masks_required: bool
    splits: list[SplitReport]
    manifest: dict
    # split -> the protocols (made for this benchmark) that evaluate on it, for splits this copy lacks
    missing_splits: dict[str, list[str]] = field(default_factory=dict)

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
                                 ("unreadable images", s.unreadable), ("counts unlike the release's", s.wrong_counts)):
                if names:
                    shown = ", ".join(names[:SHOW])
                    more = f" ... ({len(names)} in all)" if len(names) > SHOW else f" ({len(names)})"
                    out.append(f"    {label}: {shown}{more}")
        out.append("OK: everything the protocols need is present" if self.ok
                   else "PROBLEMS: something a protocol needs is missing or unreadable")
        return out


def _opens(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001  any failure means the file is not a readable image
        return False


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
            try:
                img = bench.image_path(image_id)
            except DatasetError:
                rep.missing_images.append(image_id)
                continue
            if Path(img).is_file():
                rep.images_found += 1
                files[Path(img)] = "image"
                if open_images and not _opens(img):
                    rep.unreadable.append(image_id)
            else:
                rep.missing_images.append(image_id)
            mask = bench.mask_path(image_id)
            if Path(mask).is_file():
                rep.masks_found += 1
                files[Path(mask)] = "mask"
            else:
                rep.missing_masks.append(image_id)
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
    return Report(bench.name, str(bench.root), masks, reports, manifest, missing_splits)


def manifest_hash(manifest: dict) -> str:
    """``sha256:<hex>`` of a manifest's file list (path, kind, size, sha256 of every file; not its date or
    location): two copies with equal files have the same hash, so a result can name the copy it was scored on."""
    files = sorted(({k: f.get(k) for k in ("path", "kind", "size", "sha256") if k in f}
                    for f in manifest.get("files", [])), key=lambda f: str(f.get("path")))
    blob = json.dumps({"dataset": manifest.get("dataset"), "files": files}, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def write_manifest(manifest: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return path


def compare_manifests(mine: dict, theirs: dict) -> dict[str, list[str]]:
    """Paths only in ``mine``, only in ``theirs``, and present in both with different size or sha256."""
    a = {f["path"]: f for f in mine.get("files", [])}
    b = {f["path"]: f for f in theirs.get("files", [])}
    differ = [p for p in sorted(a.keys() & b.keys())
              if a[p].get("size") != b[p].get("size") or a[p].get("sha256") != b[p].get("sha256")]
    return {"only_here": sorted(a.keys() - b.keys()), "only_there": sorted(b.keys() - a.keys()), "differ": differ}
