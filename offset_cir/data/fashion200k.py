"""Fashion200K (Han et al., ICCV 2017) with the TIRG protocol (Vo et al., CVPR 2019), docs/model.md#data and #evaluation.

Files, relative to ``root`` (every location is a setting)::

    labels/<cat>_<split>_detect_all.txt   lines "image_path \\t detection_score \\t description"
                                          (cat in dress, jacket, pants, skirt, top; split train or test)
    labels/test_queries.txt               optional: lines "source_path target_path" (the published TIRG queries)
    women/<category>/.../<id>.jpeg        images, paths as in the label files (image_root)
    beside each image, <stem>-segmask.png masks (mask_root, mask_suffix)

There are no triplets in the files; pairs are built from descriptions that differ by one word. Two
descriptions are neighbours when removing one word from each gives the same word sequence (TIRG's
"parent caption"); the modification text is ``"replace <source word> with <target word>"``.

- train: one pair per train image that has a neighbour description; the target description and the target
  image are drawn with a seeded generator (``seed``), so the list is fixed for a given copy and seed.
- test: the lines of ``test_queries.txt`` when present; otherwise one query per test image that has a
  neighbour, built the same way (a reproducible stand-in for the published list, noted in the results).

Evaluation: gallery ``all`` = every test image (unique paths); a retrieved image is a hit when its description
equals the target's; the reference is excluded (R@1/10/50).
"""
from __future__ import annotations

import logging
import random
from collections import defaultdict
from pathlib import Path

from offset_cir.data.common import Benchmark, EvalSet, Query, cached, mask_beside, read_lines
from offset_cir.errors import DatasetError

log = logging.getLogger(__name__)
CATEGORIES = ("dress", "jacket", "pants", "skirt", "top")


def word_change(source: str, target: str) -> tuple[str, str] | None:
    """(removed word, added word) when ``target`` is ``source`` with one word replaced (TIRG neighbours)."""
    a, b = source.split(), target.split()
    if len(a) != len(b) or a == b:
        return None
    for i in range(len(a)):
        for j in range(len(b)):
            if a[:i] + a[i + 1:] == b[:j] + b[j + 1:] and a[i] != b[j]:
                return a[i], b[j]
    return None


class Fashion200K(Benchmark):
    name = "fashion200k"
    default_protocol = "fashion200k-tirg"
    split_aliases = {"val": "test", "eval": "test"}

    def __init__(self, root, labels=None, image_root=None, mask_root=None, mask_suffix: str = "-segmask.png",
                 categories=None, test_queries=None, seed: int = 0, use_masks: bool = True,
                 clipseg_maps: str | None = None):
        super().__init__(root, use_masks, clipseg_maps)
        self.labels = Path(labels) if labels else self.root / "labels"
        self.image_root = Path(image_root) if image_root else self.root
        self.mask_root = Path(mask_root) if mask_root else None
        self.mask_suffix = mask_suffix
        if categories in (None, "all"):
            self.categories = list(CATEGORIES)
        else:
            self.categories = [categories] if isinstance(categories, str) else list(categories)
        self.test_queries_file = Path(test_queries) if test_queries else self.labels / "test_queries.txt"
        self.seed = int(seed)

    def label_file(self, category: str, split: str) -> Path:
        return self.labels / f"{category}_{split}_detect_all.txt"

    def splits(self) -> list[str]:
        if not self.labels.is_dir():
            raise DatasetError(f"fashion200k: no labels folder at {self.labels} (give root= or labels=)")
        return [s for s in ("train", "test") if any(self.label_file(c, s).is_file() for c in self.categories)]

    def annotation_files(self, split: str) -> list[Path]:
        split = self.canonical_split(split)
        files = [self.label_file(c, split) for c in self.categories if self.label_file(c, split).is_file()]
        if split == "test" and self.test_queries_file.is_file():
            files.append(self.test_queries_file)
        return files

    def image_path(self, image_id: str) -> Path:
        return self.image_root / image_id

    def mask_path(self, image_id: str) -> Path:
        return mask_beside(self.image_path(image_id), self.image_root, self.mask_root, self.mask_suffix)

    @cached
    def descriptions(self, split: str) -> dict[str, str]:
        """image path -> description (whitespace-normalised), over the split's label files, first wins."""
        out: dict[str, str] = {}
        for cat in self.categories:
            path = self.label_file(cat, split)
            if not path.is_file():
                continue
            for n, line in enumerate(read_lines(path, "Fashion200K label file"), 1):
                parts = line.split("\t")
                if len(parts) < 3:
                    raise DatasetError(f"{path}: line {n} has {len(parts)} tab-separated fields, "
                                       "expected 'image_path<TAB>detection_score<TAB>description'")
                img, desc = parts[0].strip(), " ".join(parts[2].split())
                if not img or not desc:
                    raise DatasetError(f"{path}: line {n} has an empty image path or description")
                out.setdefault(img, desc)
        if not out:
            raise DatasetError(f"fashion200k: no label lines for split {split} in {self.labels}")
        return out

    def _generated(self, split: str) -> list[Query]:
        """One pair per image with a one-word neighbour: a parent caption (the description less one word)
        shared with another description is drawn, then a sibling description, then an image of it (seeded)."""
        desc = self.descriptions(split)
        images_of: dict[str, list[str]] = defaultdict(list)
        for img, d in desc.items():
            images_of[d].append(img)
        groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for d in images_of:  # insertion order = file order: deterministic
            words = d.split()
            for i in range(len(words)):
                key = tuple(words[:i] + words[i + 1:])
                if not groups[key] or groups[key][-1] != d:
                    groups[key].append(d)
        parents_of: dict[str, list[tuple[str, ...]]] = {}
        for d in images_of:
            words = d.split()
            keys = dict.fromkeys(tuple(words[:i] + words[i + 1:]) for i in range(len(words)))
            parents_of[d] = [k for k in keys if len(groups[k]) > 1]
        rng = random.Random(self.seed)
        out = []
        for img, d in desc.items():
            if not parents_of[d]:
                continue
            for _ in range(16):
                td = rng.choice(groups[rng.choice(parents_of[d])])
                change = word_change(d, td) if td != d else None
                if change:
                    break
            else:
                continue
            tgt = rng.choice(images_of[td])
            out.append(Query(index=len(out), reference=img, text=f"replace {change[0]} with {change[1]}", target=tgt,
                             target_key=td))
        log.info("fashion200k %s: %d one-word-difference pairs from %d images (seed %d)", split, len(out), len(desc),
                 self.seed)
        return out

    def _from_file(self, split: str) -> list[Query]:
        desc = self.descriptions(split)
        path = self.test_queries_file
        out = []
        for n, line in enumerate(read_lines(path, "Fashion200K test queries"), 1):
            parts = line.split()
            if len(parts) != 2:
                raise DatasetError(f"{path}: line {n} should be 'source_path target_path', got {line!r}")
            src, tgt = parts
            for p in (src, tgt):
                if p not in desc:
                    raise DatasetError(f"{path}: line {n}: {p} is not in the {split} label files")
            change = word_change(desc[src], desc[tgt])
            if change is None:
                raise DatasetError(f"{path}: line {n}: descriptions {desc[src]!r} and {desc[tgt]!r} "
                                   "do not differ by one word")
            out.append(Query(index=len(out), reference=src, text=f"replace {change[0]} with {change[1]}",
                             target=tgt, target_key=desc[tgt]))
        return out

    @cached
    def _queries(self, split: str) -> list[Query]:
        if split == "test" and self.test_queries_file.is_file():
            return self._from_file(split)
        return self._generated(split)

    def eval_sets(self, split: str = "test") -> list[EvalSet]:
        split = self.canonical_split(split)
        desc = self.descriptions(split)
        source = str(self.test_queries_file) if (split == "test" and self.test_queries_file.is_file()) \
            else f"generated (one per image with a one-word neighbour, seed {self.seed})"
        return [EvalSet("all", self._queries(split), {"all": list(desc)}, keys=desc,
                        notes={"test_queries": source})]
