"""The benchmark's metadata file ``synthetic_meta.json``: its name, its layout and its one reader.

The generator writes the file last (a folder without it is an interrupted run, marked by ``PARTIAL_MARKER``);
the benchmark's loader (:class:`offset_cir.data.synthetic.benchmark.Synthetic`) reads the unseen-pair queries
from it and the generator reads it back to decide whether a folder is up to date. Both go through :func:`read_meta`.

Layout (one JSON object)::

    generator_version, seed, image_size, n_queries, mask_noise, unseen_fraction, train_queries_per_set
    config              the settings above, as one object (what makes two benchmarks the same)
    counts              split -> {"queries", "images", "sets", "unseen_queries"}
    vocab               attribute -> its values
    heldout_pairs       [[shape, colour], ...] never a dominant object in train
    unseen_pairids      split -> [pair id, ...] whose target is a held-out pair
    queries             split -> [{"pairid", "reference", "target", "changes", "kept", "unseen"}, ...]
    images              name -> {"split", attributes, "center", "radius", "angle"}
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from offset_cir.errors import DatasetError

META_NAME = "synthetic_meta.json"
PARTIAL_MARKER = ".offset-synth-partial"
REQUIRED_FIELDS = ("images", "queries", "unseen_pairids", "heldout_pairs", "vocab")


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata file at ``path``, checked: a JSON object with every field of :data:`REQUIRED_FIELDS` and
    ``unseen_pairids`` mapping each split to a list of pair ids (integers).

    A missing, malformed or foreign file raises :class:`DatasetError` naming the file and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        hint = ""
        if (path.parent / PARTIAL_MARKER).exists():
            hint = " (an interrupted generation: run `offset synth` again)"
        raise DatasetError(f"{path}: not found; expected the synthetic benchmark's metadata{hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # also a file that is not UTF-8
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object (the synthetic benchmark's metadata), "
                           f"found {type(meta).__name__}")
    for key in REQUIRED_FIELDS:
        if key not in meta:
            raise DatasetError(f"{path}: field '{key}' missing; expected a synthetic benchmark metadata file")
    unseen = meta["unseen_pairids"]
    if not isinstance(unseen, dict):
        raise DatasetError(f"{path}: field 'unseen_pairids' must map each split to a list of pair ids")
    for split, ids in unseen.items():
        if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
            raise DatasetError(f"{path}: field 'unseen_pairids.{split}' must be a list of pair ids (integers)")
    return meta


def load_meta(root) -> dict:
    """The ``synthetic_meta.json`` of the benchmark folder ``root`` (vocab, held-out pairs, per-image attributes
    and geometry, per-query changes); a clear error when it is absent (not a synthetic benchmark, or an
    interrupted run)."""
    return read_meta(Path(root) / META_NAME)


def unseen_pairids(root, split: str) -> list[int]:
    """Pair ids of ``split`` whose target's (shape, colour) pair never appears in train (sorted)."""
    meta = load_meta(root)
    if split not in meta["unseen_pairids"]:
        raise DatasetError(f"{Path(root) / META_NAME}: no split '{split}'; expected one of "
                           f"{sorted(meta['unseen_pairids'])}")
    return sorted(meta["unseen_pairids"][split])


def unseen_pairids_if_any(meta_path: str | os.PathLike, split: str) -> set[int] | None:
    """The loader's question: the unseen-pair queries of ``split`` listed in the metadata file ``meta_path``, or
    None when there is no such file (a real CIRR folder) or it lists no such split."""
    if not Path(meta_path).is_file():
        return None
    ids = read_meta(meta_path)["unseen_pairids"].get(split)
    return None if ids is None else set(ids)
