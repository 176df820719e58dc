"""Shoes (Guo et al., NeurIPS 2018; images from Berg et al., Attribute Discovery), release layout (docs/model.md#data).

Files, relative to ``root`` (every location is a setting)::

    relative_captions_shoes.json   [{"ReferenceImageName", "ImageName" (target), "RelativeCaption"}, ...]
    train_im_names.txt             one image name a line (10,000)
    eval_im_names.txt              one image name a line (4,658)
    womens_<type>/<0|1>/img_womens_<type>_<n>.jpg           images (image_root)
    womens_<type>/<0|1>/img_womens_<type>_<n>-segmask.jpg   masks beside them (mask_root, mask_suffix)
    correction_dicts/correction_dict_shoes.json             (correction_dicts)

A triplet belongs to ``train`` or ``eval`` by its reference image's list (8,990 / 1,761). The split names
``test`` and ``val`` are accepted for ``eval``. Text: the relative caption normalised with the shoes dictionary.
Evaluation: the eval triplets against the gallery ``all`` of the 4,658 eval images (docs/model.md#evaluation).

Image ids are the file names. An image is looked for in ``womens_<type>/0`` and ``womens_<type>/1``, then
anywhere under ``image_root`` (one directory walk, done only when needed).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from offset_cir.data.common import (
    Benchmark, EvalSet, Query, cached, field_of, find_correction_dict, load_json, mask_beside, normalize_caption,
    read_lines,
)
from offset_cir.errors import DatasetError

log = logging.getLogger(__name__)
_TYPE = re.compile(r"^img_(womens_.+)_\d+\.[A-Za-z]+$")


class Shoes(Benchmark):
    name = "shoes"
    default_protocol = "shoes"
    split_aliases = {"test": "eval", "val": "eval"}

    def __init__(self, root, annotations=None, image_root=None, mask_root=None, mask_suffix: str = "-segmask.jpg",
                 correction_dicts=None, use_masks: bool = True,
                 clipseg_maps: str | None = None):
        super().__init__(root, use_masks, clipseg_maps)
        self.annotations = Path(annotations) if annotations else self.root
        self.image_root = Path(image_root) if image_root else self.root
        self.mask_root = Path(mask_root) if mask_root else None
        self.mask_suffix = mask_suffix
        self.correction_setting = correction_dicts
        self._paths: dict[str, Path] = {}
        self._walked: dict[str, Path] | None = None

    @property
    def captions_file(self) -> Path:
        return self.annotations / "relative_captions_shoes.json"

    def list_file(self, split: str) -> Path:
        return self.annotations / f"{split}_im_names.txt"

    def splits(self) -> list[str]:
        if not self.captions_file.is_file():
            raise DatasetError(f"shoes: relative_captions_shoes.json not found in {self.annotations} "
                               "(give root= or annotations= pointing at the folder holding it)")
        return [s for s in ("train", "eval") if self.list_file(s).is_file()]

    def annotation_files(self, split: str) -> list[Path]:
        return [self.captions_file, self.list_file(self.canonical_split(split))]

    # -- images
    def _walk(self) -> dict[str, Path]:
        if self._walked is None:
            log.info("indexing images under %s", self.image_root)
            found: dict[str, Path] = {}
            for dirpath, _, files in os.walk(self.image_root):
                for f in files:
                    if f.startswith("img_") and self.mask_suffix not in f:
                        found.setdefault(f, Path(dirpath) / f)
            self._walked = found
        return self._walked

    def image_path(self, image_id: str) -> Path:
        hit = self._paths.get(image_id)
        if hit is not None:
            return hit
        m = _TYPE.match(image_id)
        candidates = [self.image_root / m.group(1) / sub / image_id for sub in ("0", "1")] if m else []
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            path = self._walk().get(image_id) or (candidates[0] if candidates else self.image_root / image_id)
        self._paths[image_id] = path
        return path

    def mask_path(self, image_id: str) -> Path:
        return mask_beside(self.image_path(image_id), self.image_root, self.mask_root, self.mask_suffix)

    # -- records
    @cached
    def image_list(self, split: str) -> list[str]:
        return list(dict.fromkeys(read_lines(self.list_file(split), f"Shoes {split} image list")))

    @cached
    def _all_triplets(self) -> list[tuple[str, str, str]]:
        path = self.captions_file
        data = load_json(path, "Shoes relative captions")
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of triplet records")
        fix = find_correction_dict(self.correction_setting,
                                   [self.root / "correction_dicts", self.annotations / "correction_dicts",
                                    self.annotations], "shoes")
        return [(field_of(r, "ReferenceImageName", str, path, i), field_of(r, "ImageName", str, path, i),
                 normalize_caption(field_of(r, "RelativeCaption", str, path, i), fix)) for i, r in enumerate(data)]

    @cached
    def _queries(self, split: str) -> list[Query]:
        members = set(self.image_list(split))
        rows = [t for t in self._all_triplets() if t[0] in members]
        return [Query(index=i, reference=ref, text=text, target=tgt) for i, (ref, tgt, text) in enumerate(rows)]

    def eval_sets(self, split: str = "eval") -> list[EvalSet]:
        split = self.canonical_split(split)
        queries = self._queries(split)
        notes = {"queries_with_target_equal_reference": sum(q.reference == q.target for q in queries)}
        return [EvalSet("all", queries, {"all": self.image_list(split)}, notes=notes)]
