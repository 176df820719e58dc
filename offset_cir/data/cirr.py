"""CIRR (Liu et al., ICCV 2021), release layout rc2 (docs/model.md#data).

Files (every location is a setting)::

    <annotations>/captions/cap.rc2.<split>.json
        [{"pairid", "reference", "target_hard", "target_soft", "caption",
          "img_set": {"id", "members": [6 names], "reference_rank", "target_rank"}}, ...]
        (test1 records have no target_hard, target_soft or img_set.target_rank)
    <annotations>/image_splits/split.rc2.<split>.json   {"<name>": "./<dir>/<name>.png", ...}
    <image_root>/<relative path from the split file>    images
    beside each image, <name>-segmask.png               masks (mask_root, mask_suffix)

Defaults: ``annotations`` = ``<root>/cirr`` when it holds ``captions/``, else ``<root>``; ``image_root`` =
``<root>/img_raw`` when present, else ``<root>``. Splits are whatever caption files exist (train, val, test1
for CIRR); a split's queries have targets when its records do. Captions are used as written.

- ``triplets(split)``: (reference, caption, ``target_hard``) of every record with a target (train, val);
- ``queries(split)``: every record, with its pair id and image-set members (test1: no target);
- ``eval_sets(split)``: one unit ``all``, gallery ``all`` = every image of the split file.

Evaluation (docs/model.md#evaluation): R@K over gallery ``all``; R_subset ranks the query's set members minus the
reference. The synthetic benchmark (:mod:`offset_cir.data.synthetic.benchmark`) uses this layout and adds its own
notes to the evaluation units (:meth:`CIRR.unit_notes`).
"""
from __future__ import annotations

import re
from pathlib import Path

from offset_cir.data.common import Benchmark, EvalSet, Query, cached, field_of, load_json, mask_beside
from offset_cir.errors import DatasetError


class CIRR(Benchmark):
    name = "cirr"
    default_protocol = "cirr-val"
    split_aliases = {"dev": "val", "test": "test1"}

    def __init__(self, root, annotations=None, image_root=None, mask_root=None, mask_suffix: str = "-segmask.png",
                 version: str = "rc2", use_masks: bool = True, clipseg_maps: str | None = None):
        super().__init__(root, use_masks, clipseg_maps)
        if annotations:
            self.annotations = Path(annotations)
        else:
            self.annotations = self.root / "cirr" if (self.root / "cirr" / "captions").is_dir() else self.root
        if image_root:
            self.image_root = Path(image_root)
        else:
            self.image_root = self.root / "img_raw" if (self.root / "img_raw").is_dir() else self.root
        self.mask_root = Path(mask_root) if mask_root else None
        self.mask_suffix = mask_suffix
        self.version = version

    def canonical_split(self, split: str) -> str:
        if split in self.splits():
            return split
        return super().canonical_split(split)

    def caption_file(self, split: str) -> Path:
        return self.annotations / "captions" / f"cap.{self.version}.{split}.json"

    def split_file(self, split: str) -> Path:
        return self.annotations / "image_splits" / f"split.{self.version}.{split}.json"

    def annotation_files(self, split: str) -> list[Path]:
        split = self.canonical_split(split)
        return [self.caption_file(split), self.split_file(split)]

    @cached
    def splits(self) -> list[str]:
        folder = self.annotations / "captions"
        if not folder.is_dir():
            raise DatasetError(f"{self.name}: no captions folder at {folder} "
                               "(give root= or annotations= pointing at the folder holding captions/ and image_splits/)")
        pat = re.compile(rf"^cap\.{re.escape(self.version)}\.(.+)\.json$")
        found = sorted(m.group(1) for p in folder.iterdir() if (m := pat.match(p.name)))
        order = {"train": 0, "val": 1, "test": 2, "test1": 3}
        return sorted(found, key=lambda s: (order.get(s, 9), s))

    # -- images
    @cached
    def image_table(self, split: str) -> dict[str, str]:
        """name -> relative path, from ``split.<version>.<split>.json``."""
        path = self.split_file(split)
        data = load_json(path, f"{self.name} {split} image split")
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise DatasetError(f"{path}: expected a JSON object mapping image name to relative path (str -> str)")
        return data

    @cached
    def _all_images(self) -> dict[str, str]:
        table: dict[str, str] = {}
        folder = self.annotations / "image_splits"
        pat = re.compile(rf"^split\.{re.escape(self.version)}\.(.+)\.json$")
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            if m := pat.match(p.name):
                table.update(self.image_table(m.group(1)))
        return table

    def image_path(self, image_id: str) -> Path:
        rel = self._all_images().get(image_id)
        if rel is None:
            raise DatasetError(f"{self.name}: image {image_id!r} is in no image_splits/split.{self.version}.*.json "
                               f"under {self.annotations}")
        return self.image_root / rel

    def mask_path(self, image_id: str) -> Path:
        return mask_beside(self.image_path(image_id), self.image_root, self.mask_root, self.mask_suffix)

    # -- records
    @cached
    def _queries(self, split: str) -> list[Query]:
        path = self.caption_file(split)
        data = load_json(path, f"{self.name} {split} captions")
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of query records")
        out = []
        for i, rec in enumerate(data):
            pairid = field_of(rec, "pairid", int, path, i)
            ref = field_of(rec, "reference", str, path, i)
            caption = field_of(rec, "caption", str, path, i)
            target = field_of(rec, "target_hard", str, path, i) if "target_hard" in rec else None
            img_set = rec.get("img_set")
            members: tuple[str, ...] = ()
            if img_set is not None:
                mem = field_of(img_set, "members", list, path, i)
                if not all(isinstance(m, str) for m in mem):
                    raise DatasetError(f"{path}: record {i} field 'img_set.members' must be a list of names")
                members = tuple(mem)
            out.append(Query(index=i, reference=ref, text=caption, target=target, members=members, pairid=pairid))
        return out

    def unit_notes(self, split: str) -> dict:
        """What the evaluation unit of ``split`` carries besides its records (none for CIRR)."""
        return {}

    def eval_sets(self, split: str = "val") -> list[EvalSet]:
        split = self.canonical_split(split)
        return [EvalSet("all", self._queries(split), {"all": list(self.image_table(split))},
                        notes=self.unit_notes(split))]
