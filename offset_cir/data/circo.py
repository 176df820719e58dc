"""CIRCO (Baldrati et al., ICCV 2023): composed queries over COCO 2017 "unlabeled", several ground truths each.

Files, relative to ``root`` (every location is a setting)::

    annotations/val.json     [{"id", "reference_img_id", "target_img_id", "relative_caption", "shared_concept",
                               "gt_img_ids": [target first, ...], "semantic_aspects": [...]}, ...]
    annotations/test.json    [{"id", "reference_img_id", "relative_caption", "shared_concept"}, ...]
    COCO2017_unlabeled/unlabeled2017/<12-digit COCO id>.jpg                images (image_root)
    COCO2017_unlabeled/unlabeled2017/<12-digit COCO id>-segmask.png        masks beside them (mask_root,
                                                                           mask_suffix; CIRR's naming rule)
    COCO2017_unlabeled/annotations/image_info_unlabeled2017.json           optional: the gallery's list (image_info)

Image ids are COCO ids written as decimal strings (``"243611"`` is ``000000243611.jpg``); query ids are the
records' ``id`` (``Query.pairid``). The text is ``caption_template`` filled with the record's
``relative_caption`` and ``shared_concept`` (default: the relative caption as written).

- ``val`` (220 queries): ``queries`` / ``triplets`` give reference, text and ``target_img_id`` as the target, with
  every ground truth (``Query.ground_truths``, 1 to 14, the target first) and the semantic aspects
  (``Query.aspects``); ``eval_sets`` one unit ``all`` whose gallery ``all`` is the whole gallery.
- ``test`` (800 queries): queries without targets, ground truths or aspects (scored by the benchmark's server:
  ``offset submit circo``); ``eval_sets`` the same unit over the whole gallery.
- the gallery (123,403 images, what the benchmark's own evaluation ranks for every query): the images listed in
  ``image_info_unlabeled2017.json`` when that file is there, else every ``<digits>.jpg`` of ``image_root``.

Evaluation (protocol ``circo-val``): mAP@K over all ground truths and Recall@K against the target, the whole
gallery ranked; ``offset doctor circo`` compares a copy with the counts above (:data:`EXPECTED`, the
loader's ``expected``).
"""
from __future__ import annotations

import os
import re
import string
from pathlib import Path

from offset_cir.data.common import Benchmark, EvalSet, Query, cached, field_of, load_json, mask_beside
from offset_cir.errors import DatasetError

#: counts of the release (measured from its annotation files; the gallery is COCO 2017 "unlabeled")
GALLERY_SIZE = 123_403
EXPECTED = {"val": {"triplets": 220, "images_needed": GALLERY_SIZE},
            "test": {"triplets": 800, "images_needed": GALLERY_SIZE}}
TEMPLATE_FIELDS = ("relative_caption", "shared_concept")
_IMAGE_NAME = re.compile(r"^(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)


class CIRCO(Benchmark):
    name = "circo"
    default_protocol = "circo-val"
    split_aliases = {"dev": "val"}
    expected = EXPECTED

    def __init__(self, root, annotations=None, image_root=None, image_info=None, mask_root=None,
                 mask_suffix: str = "-segmask.png", caption_template: str = "{relative_caption}",
                 use_masks: bool = True):
        super().__init__(root, use_masks)
        self.annotations = Path(annotations) if annotations else self.root / "annotations"
        coco = self.root / "COCO2017_unlabeled"
        self.image_root = Path(image_root) if image_root else coco / "unlabeled2017"
        self.image_info = Path(image_info) if image_info else coco / "annotations" / "image_info_unlabeled2017.json"
        self.mask_root = Path(mask_root) if mask_root else None
        self.mask_suffix = mask_suffix
        fields = {f for _, f, _, _ in string.Formatter().parse(caption_template) if f is not None}
        if fields - set(TEMPLATE_FIELDS):
            raise DatasetError(f"circo: caption_template={caption_template!r} has field(s) "
                               f"{sorted(fields - set(TEMPLATE_FIELDS))}; allowed: {', '.join(TEMPLATE_FIELDS)}")
        self.caption_template = caption_template

    def annotation_file(self, split: str) -> Path:
        return self.annotations / f"{split}.json"

    def annotation_files(self, split: str) -> list[Path]:
        files = [self.annotation_file(self.canonical_split(split))]
        return files + ([self.image_info] if self.image_info.is_file() else [])

    @cached
    def splits(self) -> list[str]:
        found = [s for s in ("val", "test") if self.annotation_file(s).is_file()]
        if not found:
            raise DatasetError(f"{self.name}: no annotations/val.json or annotations/test.json under "
                               f"{self.annotations} (give root= the CIRCO folder, or annotations=)")
        return found

    # -- images
    @cached
    def _listed_names(self) -> dict[str, str] | None:
        """id -> file name from ``image_info_unlabeled2017.json`` (None without that file)."""
        if not self.image_info.is_file():
            return None
        data = load_json(self.image_info, "COCO 2017 unlabeled image list")
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise DatasetError(f"{self.image_info}: expected a JSON object with an 'images' list")
        out = {}
        for i, rec in enumerate(images):
            out[str(field_of(rec, "id", int, self.image_info, i))] = field_of(rec, "file_name", str, self.image_info, i)
        return out

    @cached
    def gallery(self) -> list[str]:
        """Every gallery image id (see the module doc), in the list file's order or by id."""
        listed = self._listed_names()
        if listed is not None:
            return list(listed)
        try:
            entries = [m.group(1) for e in os.scandir(self.image_root) if (m := _IMAGE_NAME.match(e.name))]
        except OSError:
            raise DatasetError(f"{self.name}: image folder {self.image_root} not found (give image_root=, or put "
                               "the COCO 2017 unlabeled images in <root>/COCO2017_unlabeled/unlabeled2017)") from None
        return [str(i) for i in sorted({int(x) for x in entries})]

    def image_path(self, image_id: str) -> Path:
        listed = self._listed_names()
        if listed is not None and image_id in listed:
            return self.image_root / listed[image_id]
        try:
            number = int(image_id)
        except ValueError:
            raise DatasetError(f"{self.name}: image id {image_id!r} is not a COCO id (a number)") from None
        return self.image_root / f"{number:012d}.jpg"

    def mask_path(self, image_id: str) -> Path:
        return mask_beside(self.image_path(image_id), self.image_root, self.mask_root, self.mask_suffix)

    # -- records
    @cached
    def _queries(self, split: str) -> list[Query]:
        path = self.annotation_file(split)
        data = load_json(path, f"{self.name} {split} annotations")
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of query records")
        return [self._query(rec, i, path) for i, rec in enumerate(data)]

    def _query(self, rec, i: int, path: Path) -> Query:
        qid = field_of(rec, "id", int, path, i)
        ref = field_of(rec, "reference_img_id", int, path, i)
        values = {k: field_of(rec, k, str, path, i) if k in rec or k == "relative_caption" else ""
                  for k in TEMPLATE_FIELDS}
        target, gts, aspects = None, (), ()
        if "target_img_id" in rec:
            target = str(field_of(rec, "target_img_id", int, path, i))
            raw = field_of(rec, "gt_img_ids", list, path, i)
            if not raw or not all(isinstance(g, int) and not isinstance(g, bool) for g in raw):
                raise DatasetError(f"{path}: record {i} field 'gt_img_ids' must be a non-empty list of image ids")
            if len(set(raw)) != len(raw):
                raise DatasetError(f"{path}: record {i} (query {qid}) lists a ground truth twice in 'gt_img_ids'")
            gts = tuple(str(g) for g in raw)
            aspects = tuple(field_of(rec, "semantic_aspects", list, path, i)) if "semantic_aspects" in rec else ()
        return Query(index=i, reference=str(ref), text=self.caption_template.format(**values).strip(),
                     target=target, pairid=qid, ground_truths=gts, aspects=aspects)

    def eval_sets(self, split: str = "val") -> list[EvalSet]:
        split = self.canonical_split(split)
        return [EvalSet("all", self._queries(split), {"all": self.gallery()})]

    def split_images(self, split: str) -> list[str]:
        ids = dict.fromkeys(super().split_images(split))
        for q in self.queries(split):
            ids.update(dict.fromkeys(q.ground_truths))
        return list(ids)
