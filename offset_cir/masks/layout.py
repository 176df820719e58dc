"""Where images are and where their masks live (docs/model.md#data: release naming; every location is a setting).

The one place that says where an image's mask is: :func:`mask_beside` (a loader's single naming rule),
:func:`find_mask` (the names ``offset index`` / ``offset search`` look for, :data:`MASK_SUFFIXES`),
:func:`is_mask_file` / :func:`walk_images` / :func:`scan_images` (which files of a folder are images, not masks)
and, for writing masks, :class:`MaskLayout`.

A :class:`MaskLayout` maps an image path to its mask path with a pattern over these fields:
``{root}`` (the image root), ``{out}`` (output root; the image root unless ``--out`` is given),
``{rel_parent}`` (the image's folder relative to the root), ``{parent}`` (its absolute folder),
``{stem}``, ``{name}`` (file name) and ``{ext}`` (suffix without the dot).
Release presets: FashionIQ ``resized_image/<cat>_segmask/<asin>-seg.png``; Shoes ``<name>-segmask.jpg`` beside
the image; CIRR and CIRCO ``<name>-segmask.png`` beside the image; Fashion200K ``<stem>-segmask.png`` beside the
image; an image folder ``<out>/<sub folders>/<stem>-segmask.png``.
"""
from __future__ import annotations

import os
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from offset_cir.errors import DatasetError, UserInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: mask file names tried for image ``<stem>.<ext>`` (CIRR/Fashion200K, Shoes, FashionIQ naming; docs/model.md#data)
MASK_SUFFIXES = ("-segmask.png", "-segmask.jpg", "-seg.png")
_MASK_STEM_ENDINGS = ("-segmask", "-seg")
PATTERN_FIELDS = ("root", "out", "rel_parent", "parent", "stem", "name", "ext")


@dataclass(frozen=True)
class MaskLayout:
    """Image -> mask path rule; ``category`` says which path part names the image's category (prompt field)."""

    name: str
    pattern: str
    category_part: int | None = None  # index into the root-relative path parts; None = the image's folder name
    category_prefix: str = ""  # stripped from the category (Shoes: "womens_")

    def __post_init__(self):
        fields = {f for _, f, _, _ in string.Formatter().parse(self.pattern) if f is not None}
        unknown = fields - set(PATTERN_FIELDS)
        if unknown or "stem" not in fields and "name" not in fields:
            raise UserInputError(
                f"--mask-pattern {self.pattern!r}: fields must come from {{{'}, {'.join(PATTERN_FIELDS)}}} "
                "and include {stem} or {name} (so masks of different images differ)")

    def mask_path(self, image: str | os.PathLike, root: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
        """The mask file for ``image`` (under ``root``); ``out`` relocates ``{out}`` (default: ``root``)."""
        image, root = Path(image), Path(root)
        rel_parent = relative_name(image.parent, root) if image.parent != root else ""
        text = self.pattern.format(
            root=str(root), out=str(Path(out) if out is not None else root), rel_parent=rel_parent,
            parent=str(image.parent), stem=image.stem, name=image.name, ext=image.suffix.lstrip("."),
        )
        return Path(os.path.normpath(text))

    def category(self, image: str | os.PathLike, root: str | os.PathLike) -> str:
        """Category of an image for the ``{category}`` prompt field (e.g. FashionIQ ``dress``)."""
        image = Path(image)
        parts = PurePosixPath(relative_name(image, root)).parts
        if self.category_part is not None and len(parts) > self.category_part + 1:
            value = parts[self.category_part]
        else:
            value = image.parent.name
        if self.category_prefix and value.startswith(self.category_prefix):
            value = value[len(self.category_prefix):]
        return value.replace("_", " ")


LAYOUTS: dict[str, MaskLayout] = {
    "fashioniq": MaskLayout("fashioniq", "{out}/{rel_parent}_segmask/{stem}-seg.png", category_part=1),
    "shoes": MaskLayout("shoes", "{out}/{rel_parent}/{stem}-segmask.jpg", category_part=0, category_prefix="womens_"),
    "cirr": MaskLayout("cirr", "{out}/{rel_parent}/{stem}-segmask.png"),
    "fashion200k": MaskLayout("fashion200k", "{out}/{rel_parent}/{stem}-segmask.png", category_part=1),
    "circo": MaskLayout("circo", "{out}/{rel_parent}/{stem}-segmask.png"),
    "images": MaskLayout("images", "{out}/{rel_parent}/{stem}-segmask.png"),
}
DATASETS = ("fashioniq", "shoes", "cirr", "fashion200k", "circo")


def get_layout(name: str, pattern: str | None = None) -> MaskLayout:
    """A preset by name, or a preset's category rule with the user's own ``pattern``."""
    if name not in LAYOUTS:
        raise UserInputError(f"unknown layout {name!r}: expected one of {', '.join(LAYOUTS)}")
    base = LAYOUTS[name]
    if pattern is None:
        return base
    return MaskLayout(name, pattern, base.category_part, base.category_prefix)


def mask_path_for(image: str | os.PathLike, layout: str | MaskLayout = "images", root: str | os.PathLike | None = None,
                  out: str | os.PathLike | None = None) -> Path:
    """One-call form of :meth:`MaskLayout.mask_path` (``root`` defaults to the image's folder)."""
    lay = layout if isinstance(layout, MaskLayout) else get_layout(layout)
    return lay.mask_path(image, root if root is not None else Path(image).parent, out)


def relative_name(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """POSIX path of ``path`` relative to ``root`` (the key used in captions files)."""
    return Path(os.path.relpath(Path(path), Path(root))).as_posix()


def is_mask_file(path: str | os.PathLike) -> bool:
    """A mask (``<stem>-segmask.*`` or ``<stem>-seg.*``, any case, or a file in a ``*_segmask`` folder), or a hidden
    or temporary file: never an image of a gallery or a benchmark."""
    path = Path(path)
    return (path.stem.lower().endswith(_MASK_STEM_ENDINGS) or path.parent.name.endswith("_segmask")
            or path.name.startswith(".") or path.name.endswith(".tmp"))


def walk_images(folder: str | os.PathLike, exclude: tuple = ()) -> list[Path]:
    """Every image file under ``folder``, recursively, sorted: hidden entries, ``*_segmask`` folders, mask files
    (:func:`is_mask_file`) and the folders in ``exclude`` (other than ``folder`` itself) are skipped."""
    folder = Path(folder)
    skip = {Path(e).resolve() for e in exclude} - {folder.resolve()}
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and not n.endswith("_segmask")
                             and (not skip or (d / n).resolve() not in skip))
        for fname in filenames:
            p = d / fname
            if p.suffix.lower() in IMAGE_EXTENSIONS and not is_mask_file(p):
                found.append(p)
    return sorted(found)


def scan_images(root: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> list[tuple[str, Path]]:
    """Every image of a gallery folder (:func:`walk_images`) as ``(id, path)``, for the search index.

    The id is the path relative to ``root`` without its extension (``shoes/img_1``); when two files differ only by
    extension both keep it (``a.png``, ``a.jpg``). Sorted by id; ``root`` is resolved.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DatasetError(f"images folder {root} does not exist or is not a folder")
    found = walk_images(root, tuple(exclude))
    rels = [p.relative_to(root).as_posix() for p in found]
    stems = [r.rsplit(".", 1)[0] for r in rels]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    out = [(s if counts[s] == 1 else r, p) for s, r, p in zip(stems, rels, found)]
    out.sort(key=lambda t: t[0])
    return out


def mask_beside(image_path: str | os.PathLike, image_root: str | os.PathLike, mask_root: str | os.PathLike | None,
                suffix: str) -> Path:
    """Mask path ``<stem><suffix>`` beside the image, or at the same relative place under ``mask_root``."""
    name = Path(image_path).stem + suffix
    if mask_root is None:
        return Path(image_path).with_name(name)
    try:
        rel = Path(image_path).parent.relative_to(image_root)
    except ValueError:
        rel = Path()
    return Path(mask_root) / rel / name


def find_mask(image: str | os.PathLike, root: str | os.PathLike | None = None,
              mask_root: str | os.PathLike | None = None, generated: str | os.PathLike | None = None) -> Path | None:
    """The stored mask of ``image`` (resolved), or None: ``<stem><suffix>`` for each of :data:`MASK_SUFFIXES`
    beside the image, else in ``mask_root`` at the image's place relative to ``root`` (mirroring sub-folders),
    else flat in ``mask_root``; else ``generated`` (a mask the caller made earlier) when that file exists."""
    image = Path(image)
    root = Path(root) if root is not None else image.parent
    candidates = [mask_beside(image, root, None, suf) for suf in MASK_SUFFIXES]
    if mask_root is not None:
        candidates += [mask_beside(image, root, mask_root, suf) for suf in MASK_SUFFIXES]
        if image.parent != root:
            candidates += [Path(mask_root) / (image.stem + suf) for suf in MASK_SUFFIXES]
    if generated is not None:
        candidates.append(Path(generated))
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    return None


# Where each release keeps its images, relative to --root (docs/model.md#data).
_RELEASE_FOLDERS = {
    "fashioniq": ("resized_image/*", "resized_image/<category>/<asin>.jpg"),
    "shoes": ("womens_*", "womens_<type>/<0or1>/img_womens_<type>_<n>.jpg"),
    "cirr": ("{train,dev,test1}", "train/<n>/<name>.png, dev/<name>.png, test1/<name>.png"),
    "fashion200k": ("women", "women/<category>/<sub category>/<id>/<id>_<k>.jpeg"),
    "circo": ("COCO2017_unlabeled/unlabeled2017", "COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg"),
}


def find_images(layout: str, root: str | os.PathLike, exclude: tuple = ()) -> list[Path]:
    """Every image of a benchmark release (``layout`` in DATASETS) or of a folder (``images``), sorted.

    Folders in ``exclude`` (e.g. an output folder inside the image folder) are not walked.
    """
    root = Path(root)
    skip = {Path(os.path.abspath(e)) for e in exclude if Path(os.path.abspath(e)) != Path(os.path.abspath(root))}
    if not root.is_dir():
        raise DatasetError(f"--root {root}: folder not found")
    if layout == "images":
        folders = [root]
    elif layout == "fashioniq":
        base = root / "resized_image"
        folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.endswith("_segmask")) if base.is_dir() else []
    elif layout == "shoes":
        folders = sorted(p for p in root.glob("womens_*") if p.is_dir())
    elif layout == "cirr":
        folders = [root / n for n in ("train", "dev", "test1") if (root / n).is_dir()]
    elif layout == "fashion200k":
        folders = [root / "women"] if (root / "women").is_dir() else []
    elif layout == "circo":
        folders = [root / _RELEASE_FOLDERS["circo"][0]] if (root / _RELEASE_FOLDERS["circo"][0]).is_dir() else []
    else:
        raise UserInputError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    images = sorted({p for folder in folders for p in walk_images(folder, exclude)
                     if not any(Path(os.path.abspath(p)).is_relative_to(e) for e in skip)})
    if not images:
        where = _RELEASE_FOLDERS.get(layout, (None, "<any sub folder>/<image>"))[1]
        raise DatasetError(f"--root {root}: no images found for {layout}; expected the release layout {where} "
                           f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    return images
