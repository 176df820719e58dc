"""FashionIQ (Wu et al., CVPR 2021), release layout (docs/model.md#data).

Files, relative to ``root`` (every location is a setting)::

    captions/cap.<cat>.<split>.json       [{"candidate": asin, "target": asin, "captions": [str, str]}, ...]
                                          (test records have no "target")
    image_splits/split.<cat>.<split>.json [asin, ...]      (every image of that category and split)
    resized_image/<cat>/<asin>.jpg        images            (image_root / image_pattern)
    resized_image/<cat>_segmask/<asin>-seg.png  masks       (mask_root / mask_pattern)
    correction_dicts/correction_dict_<cat>.json             (correction_dicts)

Categories: dress, shirt, toptee; trained jointly (default) or one at a time (``categories="dress"``).
Text: each caption normalised (:func:`normalize_caption` with the category's dictionary), then joined with
" and " in file order; an empty caption is left out of the join (:func:`join_captions`).

Image ids are ``"<cat>/<asin>"`` (an asin is only unique within a category).

Evaluation (docs/model.md#evaluation): per category, queries are the val triplets; gallery ``union`` = the reference and
target images of that category's val triplets (first-appearance order), gallery ``full`` = every image of
``split.<cat>.val.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from offset_cir.data.common import (
    Benchmark, EvalSet, Query, cached, field_of, find_correction_dict, join_captions, load_json, normalize_caption,
)
from offset_cir.errors import DatasetError

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")


class FashionIQ(Benchmark):
    name = "fashioniq"
    default_protocol = "fashioniq"

    def __init__(self, root, categories: str | Sequence[str] | None = None, annotations=None, image_root=None,
                 image_pattern: str = "{category}/{name}.jpg", mask_root=None,
                 mask_pattern: str = "{category}_segmask/{name}-seg.png", correction_dicts=None,
                 use_masks: bool = True,
                 clipseg_maps: str | None = None):
        super().__init__(root, use_masks, clipseg_maps)
        if categories in (None, "all", "joint"):
            cats = list(CATEGORIES)
        elif isinstance(categories, str):
            cats = [c.strip() for c in categories.split(",") if c.strip()]
        else:
            cats = list(categories)
        cats = list(dict.fromkeys(cats))  # "dress,dress" is one category (one evaluation unit)
        bad = [c for c in cats if c not in CATEGORIES]
        if bad or not cats:
            raise DatasetError(f"fashioniq: unknown category {bad or categories!r}; choose from {', '.join(CATEGORIES)} or 'all'")
        self.categories = cats
        self.annotations = Path(annotations) if annotations else self.root
        self.image_root = Path(image_root) if image_root else self.root / "resized_image"
        self.mask_root = Path(mask_root) if mask_root else self.image_root
        self.image_pattern, self.mask_pattern = image_pattern, mask_pattern
        self.correction_setting = correction_dicts

    # -- files
    def caption_file(self, category: str, split: str) -> Path:
        return self.annotations / "captions" / f"cap.{category}.{split}.json"

    def split_file(self, category: str, split: str) -> Path:
        return self.annotations / "image_splits" / f"split.{category}.{split}.json"

    def annotation_files(self, split: str) -> list[Path]:
        split = self.canonical_split(split)
        return [p for c in self.categories for p in (self.caption_file(c, split), self.split_file(c, split))]

    def splits(self) -> list[str]:
        found = [s for s in SPLITS if all(self.caption_file(c, s).is_file() for c in self.categories)]
        if not found and not (self.annotations / "captions").is_dir():
            raise DatasetError(f"fashioniq: no captions folder at {self.annotations / 'captions'} "
                               "(give root= or annotations= pointing at the folder holding captions/ and image_splits/)")
        return found

    @staticmethod
    def _split_id(image_id: str) -> tuple[str, str]:
        cat, _, asin = image_id.partition("/")
        if not asin:
            raise DatasetError(f"fashioniq image id {image_id!r} is not '<category>/<asin>'")
        return cat, asin

    def image_path(self, image_id: str) -> Path:
        cat, asin = self._split_id(image_id)
        return self.image_root / self.image_pattern.format(category=cat, name=asin)

    def mask_path(self, image_id: str) -> Path:
        cat, asin = self._split_id(image_id)
        return self.mask_root / self.mask_pattern.format(category=cat, name=asin)

    @cached
    def corrections(self, category: str) -> dict[str, str]:
        return find_correction_dict(self.correction_setting,
                                    [self.root / "correction_dicts", self.annotations / "correction_dicts",
                                     self.annotations / "captions"], category)

    # -- records
    @cached
    def _category_queries(self, category: str, split: str) -> list[tuple[str, str | None, str]]:
        path = self.caption_file(category, split)
        data = load_json(path, f"FashionIQ {category} {split} captions")
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of triplet records")
        fix = self.corrections(category)
        out = []
        for i, rec in enumerate(data):
            cand = field_of(rec, "candidate", str, path, i)
            target = field_of(rec, "target", str, path, i) if (split != "test" or "target" in rec) else None
            caps = field_of(rec, "captions", list, path, i)
            if not all(isinstance(c, str) for c in caps):
                raise DatasetError(f"{path}: record {i} field 'captions' must be a list of strings")
            out.append((cand, target, join_captions([normalize_caption(c, fix) for c in caps])))
        return out

    @cached
    def split_list(self, category: str, split: str) -> list[str]:
        path = self.split_file(category, split)
        data = load_json(path, f"FashionIQ {category} {split} image split")
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise DatasetError(f"{path}: expected a JSON list of image names (str)")
        return data

    def _queries(self, split: str) -> list[Query]:
        out: list[Query] = []
        for cat in self.categories:
            for cand, target, text in self._category_queries(cat, split):
                out.append(Query(index=len(out), reference=f"{cat}/{cand}", text=text,
                                 target=f"{cat}/{target}" if target else None, group=cat))
        return out

    def eval_sets(self, split: str = "val") -> list[EvalSet]:
        split = self.canonical_split(split)
        sets = []
        for cat in self.categories:
            queries = [Query(index=i, reference=f"{cat}/{cand}", text=text,
                             target=f"{cat}/{target}" if target else None, group=cat)
                       for i, (cand, target, text) in enumerate(self._category_queries(cat, split))]
            union: dict[str, None] = {}
            for q in queries:
                union[q.reference] = None
                if q.target:
                    union[q.target] = None
            galleries = {"union": list(union), "full": [f"{cat}/{a}" for a in dict.fromkeys(self.split_list(cat, split))]}
            sets.append(EvalSet(cat, queries, galleries))
        return sets
