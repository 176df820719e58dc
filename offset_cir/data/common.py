"""Shared pieces of the benchmark loaders (docs/model.md#data).

- caption normalisation with the correction dictionaries (FashionIQ, Shoes),
- reading annotation files with errors that name the file, record and field,
- opening images (RGB) and masks ("L") lazily, one item at a time,
- the record types (:class:`Query`, :class:`EvalSet`) and the torch Datasets built on them
  (:class:`TripletDataset`, :class:`QueryDataset`, :class:`ImageDataset`) and :func:`collate`,
- :class:`Benchmark`, the base class of every loader, the one route by which those Datasets are opened (with
  the check that a copy set up without masks is not asked for masks).

A mask has its image's size, or is a CLIPSeg map of the release's download (:mod:`offset_cir.data.mask_fit`).
"No mask" is ``None`` everywhere: a Dataset built with ``use_masks=False`` yields ``None`` for its masks,
:func:`collate` keeps a batch of them ``None``, and the model takes ``None``.

Nothing here reads a file at import time; a benchmark reads its annotation files on first use and
never reads an image before a Dataset item is requested.
"""
from __future__ import annotations

import functools
import json
import logging
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch.utils.data import Dataset

from offset_cir.data.mask_fit import CLIPSEG_MAPS, is_clipseg_map, mask_size_problem, preprocess_pair
from offset_cir.errors import DatasetError
from offset_cir.images import ImageReadError, read_image
from offset_cir.masks.layout import mask_beside  # noqa: F401  (where a mask lives: said in one place, for the loaders)

log = logging.getLogger(__name__)

_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})


# --------------------------------------------------------------------------------------------- captions
def normalize_caption(text: str, corrections: dict[str, str] | None = None) -> str:
    """docs/model.md#data: lowercase; every ASCII punctuation character becomes a space; split on whitespace;
    map each token through the correction dictionary; join with single spaces.

    An empty (or punctuation-only) caption becomes the empty string ``""``. A correction may expand to
    several words ("vneck" -> "v neck"); the result is re-split so spaces stay single.
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    tokens = text.lower().translate(_PUNCT_TO_SPACE).split()
    if corrections:
        tokens = [corrections.get(t, t) for t in tokens]
    return " ".join(" ".join(tokens).split())


def join_captions(captions: Sequence[str]) -> str:
    """FashionIQ text: normalised captions joined with " and " in file order (docs/model.md#data).

    Defined behaviour for empty captions (16 in the release): an empty caption is left out of the join, so
    ``["", "is red"]`` gives ``"is red"``; two empty captions give ``""`` (the model then sees an empty text).
    """
    return " and ".join(c for c in captions if c)


def load_correction_dict(path: Path) -> dict[str, str]:
    """A ``correction_dict_<name>.json`` file: a JSON object mapping a typo token to its fix."""
    data = load_json(path, "correction dictionary")
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise DatasetError(f"{path}: expected a JSON object mapping a word to its correction (str -> str)")
    return {k.lower(): v.lower() for k, v in data.items()}


def find_correction_dict(setting: str | Path | None, candidates: Iterable[Path], name: str) -> dict[str, str]:
    """Load ``correction_dict_<name>.json``.

    ``setting``: a folder (must hold the file), ``False``/``"none"`` for no corrections, or ``None`` (auto: the
    first of ``candidates`` that holds the file; when none does, a warning and no corrections).
    """
    fname = f"correction_dict_{name}.json"
    if setting is False or (isinstance(setting, str) and setting.lower() == "none"):
        return {}
    if setting is not None:
        path = Path(setting) / fname
        if not path.is_file():
            raise DatasetError(f"correction dictionary not found: {path} (setting correction_dicts={setting})")
        return load_correction_dict(path)
    for folder in candidates:
        if (Path(folder) / fname).is_file():
            return load_correction_dict(Path(folder) / fname)
    log.warning("no %s found (looked in %s); captions are normalised without corrections",
                fname, ", ".join(str(c) for c in candidates))
    return {}


# --------------------------------------------------------------------------------------------- files
def load_json(path: Path, what: str) -> Any:
    """Read a JSON file; a missing or malformed file raises DatasetError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}); expected the {what}") from None


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty stripped lines of a text file; a missing file raises DatasetError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def field_of(record: Any, key: str, kind: type | tuple, path: Path, i: int) -> Any:
    """``record[key]`` checked for type; errors name the file, the record number and the field."""
    if not isinstance(record, dict):
        raise DatasetError(f"{path}: record {i} is a {type(record).__name__}, expected a JSON object")
    if key not in record:
        raise DatasetError(f"{path}: record {i} has no field {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DatasetError(f"{path}: record {i} field {key!r} is {type(value).__name__}, expected {want}")
    return value


def open_image(path: Path, mode: str = "RGB", what: str = "image"):
    """Open an image file as a PIL image in ``mode`` ("RGB" for images, "L" for masks), fully decoded
    (:func:`offset_cir.images.read_image`); what cannot be read raises DatasetError naming the file."""
    try:
        return read_image(Path(path), mode, what=what)
    except ImageReadError as exc:
        raise DatasetError(str(exc)) from None


# --------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Query:
    """One composed query (docs/model.md#data): reference id, text, and what evaluation needs.

    ``target`` is None where the split has no targets (CIRR test1, FashionIQ test). ``members`` are the
    CIRR image-set members (for R_subset). ``pairid`` is the CIRR pair id (CIRCO: the query id). ``target_key``
    is what a hit must match when it is not the target id (Fashion200K: the target's description).
    ``ground_truths`` are every image that answers the query, the target first (CIRCO; empty elsewhere), and
    ``aspects`` the query's semantic aspects (CIRCO val).
    """

    index: int
    reference: str
    text: str
    target: str | None = None
    members: tuple[str, ...] = ()
    pairid: int | None = None
    group: str = ""
    target_key: str | None = None
    ground_truths: tuple[str, ...] = ()
    aspects: tuple[str, ...] = ()


@dataclass
class EvalSet:
    """Queries and galleries of one evaluation unit (a split, or one FashionIQ category of it): records only.

    ``galleries`` maps a gallery name (``union``, ``full``, ``all``) to its image ids; ``keys`` maps
    a gallery id to its match key (Fashion200K descriptions), None elsewhere. Its Datasets are opened by its
    benchmark (:meth:`Benchmark.unit_query_dataset`, :meth:`Benchmark.image_dataset`).
    """

    name: str
    queries: list[Query]
    galleries: dict[str, list[str]]
    keys: dict[str, str] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # what error messages name, e.g. "fashioniq split val, unit dress" (set by evaluate)

    def describe(self) -> str:
        """What error messages about this unit's items name."""
        return self.source or f"evaluation unit {self.name}"


# --------------------------------------------------------------------------------------------- datasets
class _Loader:
    """Opens image and mask of an id and runs ``preprocess.pair`` (shared by the Datasets)."""

    def __init__(self, image_path, mask_path, preprocess, use_masks: bool, train: bool, source: str = "",
                 clipseg_maps: str | None = None):
        self.image_path, self.mask_path = image_path, mask_path
        self.preprocess, self.use_masks, self.train = preprocess, bool(use_masks), bool(train)
        self.source, self.clipseg_maps = source, clipseg_maps

    def load(self, image_id: str, record: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image tensor, mask tensor) of ``image_id``; the mask is None when masks are not used."""
        ipath = self.image_path(image_id)
        by_file = getattr(self.preprocess, "files", None)  # a feature cache's preprocess reads warmed files by name
        if by_file is not None:
            hit = by_file(ipath, self.mask_path(image_id) if self.use_masks else None)
            if hit is not None and (hit[1][1] is None or hit[1][1] == hit[1][0] or (
                    self.clipseg_maps == "release" and is_clipseg_map(hit[1][1], hit[1][0]))):
                return hit[0]  # else decode: the checks below name what is wrong (or resize the mask)
        img = open_image(ipath, "RGB", "image")
        mask = None
        if self.use_masks:
            mpath = self.mask_path(image_id)
            if not Path(mpath).is_file():
                raise DatasetError(
                    f"mask not found: {mpath} (image {image_id}); make masks with `offset masks`, "
                    "or use a model configured without masks (ablation w/o FM)")
            mask = open_image(mpath, "L", "mask")
            problem = mask_size_problem(mask.size, img.size, self.clipseg_maps)
            if problem:
                where = ", ".join(x for x in (self.source, record) if x) or f"image {image_id}"
                raise DatasetError(f"{where}: mask {mpath} {problem.replace('its image', f'its image {ipath}', 1)}")
        return preprocess_pair(self.preprocess, img, mask, self.train, self.clipseg_maps)


class _QueryItems(Dataset):
    """What the triplet and query datasets share: their queries, and the loader of their images and masks."""

    def __init__(self, queries: list[Query], loader: _Loader):
        self.queries = queries
        self._loader = loader

    def __len__(self) -> int:
        return len(self.queries)


# The three Datasets take their arguments in one order: records (queries or image ids), image_path, mask_path,
# preprocess, then by keyword use_masks, train (for those with a training transform) and source. Open them through
# a Benchmark (triplets, query_dataset, unit_query_dataset, image_dataset), which checks the mask setting.
class TripletDataset(_QueryItems):
    """Training/eval triplets: items ``{"ref_image","ref_mask","text","tgt_image","tgt_mask","index"}``.

    Images are read from disk when an item is requested; the masks are None when ``use_masks`` is False.
    """

    def __init__(self, queries: list[Query], image_path, mask_path, preprocess, *, use_masks: bool, train: bool,
                 source: str = "", clipseg_maps: str | None = None):
        missing = [q for q in queries if q.target is None]
        if missing:
            raise DatasetError(f"triplets need targets; query {missing[0].index} (reference {missing[0].reference}) has none")
        super().__init__(queries, _Loader(image_path, mask_path, preprocess, use_masks, train, source, clipseg_maps))

    def __getitem__(self, i: int) -> dict:
        q = self.queries[i]
        record = f"triplet {i} (reference {q.reference}, target {q.target})"
        ref, ref_m = self._loader.load(q.reference, f"{record}, its reference")
        tgt, tgt_m = self._loader.load(q.target, f"{record}, its target")
        return {"ref_image": ref, "ref_mask": ref_m, "text": q.text, "tgt_image": tgt, "tgt_mask": tgt_m, "index": i}


class QueryDataset(_QueryItems):
    """Evaluation queries: ``{"ref_image","ref_mask","text","index"}`` (evaluation transform unless ``train``);
    ``ref_mask`` is None when ``use_masks`` is False."""

    def __init__(self, queries: list[Query], image_path, mask_path, preprocess, *, use_masks: bool,
                 train: bool = False, source: str = "", clipseg_maps: str | None = None):
        super().__init__(queries, _Loader(image_path, mask_path, preprocess, use_masks, train, source, clipseg_maps))

    def __getitem__(self, i: int) -> dict:
        q = self.queries[i]
        ref, ref_m = self._loader.load(q.reference, f"query {i} (reference {q.reference})")
        return {"ref_image": ref, "ref_mask": ref_m, "text": q.text, "index": i}


class ItemSeededDataset(Dataset):
    """Wraps a Dataset so that each item's random augmentation (torch's RNG: the training crop) is drawn from a
    generator seeded by ``(seed, unit, index)`` alone: the same crops whatever the DataLoader's worker count, batch
    size, order, rank or interruption, and the caller's RNG state is left untouched.

    Evaluation asks for item ``i``; its unit is ``salt`` (the evaluation unit's name: FashionIQ categories share
    item indices). Training asks for ``(epoch, i)``, as its sampler yields them; the unit is the epoch."""

    def __init__(self, base: Dataset, seed: int, salt: str = ""):
        import zlib

        self.base, self.seed, self.salt = base, int(seed), str(salt)
        self._salt_code = zlib.crc32(self.salt.encode("utf-8"))

    def __len__(self) -> int:
        return len(self.base)

    def item_seed(self, i: int, unit: int | None = None) -> int:
        """The seed of item ``i`` of ``unit`` (an integer such as the epoch; None: this dataset's ``salt``)."""
        code = self._salt_code if unit is None else int(unit)
        return (self.seed * 1_000_003 + code * 10_007 + int(i)) % (2**63)

    def __getitem__(self, key):
        unit, i = key if isinstance(key, tuple) else (None, key)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (what fork_rng restores and the transforms draw from): the stream of
            # torch.manual_seed, without seeding every other device (which costs far more per item:
            # benchmarks/train_speed.py --cache-fill)
            torch.default_generator.manual_seed(self.item_seed(i, unit))
            return self.base[i]


class ImageDataset(Dataset):
    """Gallery images: ``{"image","mask","index"}`` (evaluation transform); ``mask`` is None when ``use_masks``
    is False.

    ``report_unreadable``: an image or mask that cannot be loaded gives ``{"index": i, "error": message}`` instead
    of raising, so one broken file does not stop a long run (the search index lists it as unreadable)."""

    def __init__(self, ids: Sequence[str], image_path, mask_path, preprocess, *, use_masks: bool, source: str = "",
                 clipseg_maps: str | None = None, report_unreadable: bool = False):
        self.ids = list(ids)
        self._loader = _Loader(image_path, mask_path, preprocess, use_masks, False, source, clipseg_maps)
        self.report_unreadable = bool(report_unreadable)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        if not self.report_unreadable:
            img, mask = self._loader.load(self.ids[i], f"image {i} ({self.ids[i]})")
            return {"image": img, "mask": mask, "index": i}
        try:
            img, mask = self._loader.load(self.ids[i], f"image {self.ids[i]}")
        except DatasetError as exc:
            return {"index": i, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001  a broken file must not stop a million-image run
            return {"index": i, "error": f"{self._loader.image_path(self.ids[i])}: {type(exc).__name__}: {exc}"}
        return {"image": img, "mask": mask, "index": i}


def collate(batch: list[dict]) -> dict:
    """DataLoader collate: tensors stacked, ``text`` kept a list of str, ``index`` a LongTensor.

    A key whose values are all None (the masks of a Dataset built with ``use_masks=False``) stays None; None
    beside tensors under one key is refused (a batch either has its masks or has none).
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        nones = sum(v is None for v in values)
        if nones:
            if nones != len(values):
                raise ValueError(f"collate: {key!r} is None in {nones} of {len(values)} items; "
                                 "expected all None (no masks) or all tensors")
            out[key] = None
        elif key == "text":
            out[key] = list(values)
        elif key == "index":
            out[key] = torch.as_tensor(values, dtype=torch.long)
        elif isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


# --------------------------------------------------------------------------------------------- base class
class Benchmark:
    """Base of every loader. Subclasses implement :meth:`_queries`, :meth:`eval_sets`, :meth:`image_path`,
    :meth:`mask_path`, :meth:`splits`, and may give :attr:`expected` counts (for ``offset doctor``).

    Settings common to all: ``root``, ``use_masks`` (False: this copy has no masks; only models without masks
    may use it), ``clipseg_maps`` (how the maps of the release's download load; :mod:`offset_cir.data.mask_fit`).
    """

    name = "benchmark"
    default_protocol = ""
    split_aliases: dict[str, str] = {}
    expected: dict[str, dict[str, int]] = {}  # split -> counts of the release, by the doctor's fields

    def __init__(self, root: str | Path, use_masks: bool = True, clipseg_maps: str | None = None):
        self.root = Path(root).expanduser()
        self.use_masks = bool(use_masks)
        if isinstance(clipseg_maps, str) and clipseg_maps.lower() == "none":
            clipseg_maps = None
        if clipseg_maps not in (None, *CLIPSEG_MAPS):
            raise DatasetError(f"{self.name}: clipseg_maps={clipseg_maps!r}; expected release, aligned or none")
        self.clipseg_maps = clipseg_maps
        if not self.root.is_dir():
            raise DatasetError(f"{self.name} root is not a folder: {self.root}")

    # -- to implement
    def splits(self) -> list[str]:
        raise NotImplementedError

    def _queries(self, split: str) -> list[Query]:
        raise NotImplementedError

    def image_path(self, image_id: str) -> Path:
        raise NotImplementedError

    def mask_path(self, image_id: str) -> Path:
        raise NotImplementedError

    def eval_sets(self, split: str) -> list[EvalSet]:
        raise NotImplementedError

    def annotation_files(self, split: str) -> list[Path]:
        raise NotImplementedError

    def split_images(self, split: str) -> list[str]:
        """Every image id a split's protocol needs (queries, targets, galleries)."""
        ids: dict[str, None] = {}
        for es in self.eval_sets(split):
            for q in es.queries:
                ids[q.reference] = None
                if q.target is not None:
                    ids[q.target] = None
            for g in es.galleries.values():
                ids.update(dict.fromkeys(g))
        return list(ids)

    # -- shared
    def canonical_split(self, split: str) -> str:
        split = self.split_aliases.get(split, split)
        if split not in self.splits():
            raise DatasetError(f"{self.name}: unknown split {split!r}; this copy has {', '.join(self.splits()) or 'none'}")
        return split

    def queries(self, split: str) -> list[Query]:
        """The composed queries (triplets) of a split, in file order."""
        return self._queries(self.canonical_split(split))

    # -- Datasets: every one is opened by _open, which checks the mask setting
    def _open(self, dataset_cls, records, preprocess, use_masks: bool, source: str, **kwargs):
        """``dataset_cls(records, image_path, mask_path, preprocess, use_masks=..., source=..., **kwargs)``;
        asking for masks from a copy set up with ``use_masks=False`` is refused here, for every Dataset."""
        if use_masks and not self.use_masks:
            raise DatasetError(f"{self.name} was set up with use_masks=False but the model needs masks; "
                               "give use_masks=True and the mask location, or use a model without masks (w/o FM)")
        return dataset_cls(records, self.image_path, self.mask_path, preprocess, use_masks=bool(use_masks),
                           source=source, clipseg_maps=self.clipseg_maps, **kwargs)

    def triplets(self, split: str, preprocess, train: bool = True, use_masks: bool = True) -> TripletDataset:
        """Triplets of a split as a lazily loading torch Dataset (architecture: data contract)."""
        split = self.canonical_split(split)
        return self._open(TripletDataset, self.queries(split), preprocess, use_masks, f"{self.name} split {split}",
                          train=train)

    def query_dataset(self, split: str, preprocess, use_masks: bool = True) -> QueryDataset:
        """All queries of a split (evaluation transform); targets may be absent."""
        split = self.canonical_split(split)
        return self._open(QueryDataset, self.queries(split), preprocess, use_masks, f"{self.name} split {split}")

    def unit_query_dataset(self, unit: EvalSet, preprocess, use_masks: bool = True,
                           train: bool = False) -> QueryDataset:
        """The queries of one evaluation unit (evaluation transform unless ``train``, docs/model.md#a2)."""
        return self._open(QueryDataset, unit.queries, preprocess, use_masks, unit.describe(), train=train)

    def image_dataset(self, ids: Sequence[str], preprocess, use_masks: bool = True, source: str = "") -> ImageDataset:
        """Images of this benchmark by id (evaluation transform): a gallery, or any list of ids."""
        return self._open(ImageDataset, list(ids), preprocess, use_masks, source or f"{self.name} images")

    def gallery_dataset(self, split: str, preprocess, use_masks: bool = True, gallery: str | None = None,
                        group: str | None = None) -> ImageDataset:
        """The gallery images of a split (first evaluation unit unless ``group`` names one)."""
        split = self.canonical_split(split)
        sets = self.eval_sets(split)
        es = next((s for s in sets if group in (None, s.name)), None)
        if es is None:
            raise DatasetError(f"{self.name}: no evaluation unit {group!r} in split {split}")
        name = gallery or next(iter(es.galleries))
        if name not in es.galleries:
            raise DatasetError(f"{self.name}: unknown gallery {name!r}; choose from {', '.join(es.galleries)}")
        es.source = es.source or f"{self.name} split {split}, unit {es.name}"
        return self.image_dataset(es.galleries[name], preprocess, use_masks, source=f"{es.describe()}, gallery")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r})"


def cached(method):
    """Cache a zero/one-argument method's result on the instance (annotation files read once)."""
    attr = f"_cache_{method.__name__}"

    @functools.wraps(method)
    def wrapper(self, *args):
        store = self.__dict__.setdefault(attr, {})
        if args not in store:
            store[args] = method(self, *args)
        return store[args]

    return wrapper
