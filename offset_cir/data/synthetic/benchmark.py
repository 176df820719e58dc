"""The synthetic benchmark's loader: CIRR's layout, plus the unseen-pair queries of ``synthetic_meta.json``.

A folder written by ``offset synth`` (:func:`offset_cir.data.synthetic.generate`) holds CIRR's files
(:mod:`offset_cir.data.cirr`) for the splits train, val and test, every split with targets, and the metadata file
``synthetic_meta.json`` (:mod:`offset_cir.data.synthetic.meta`, its one reader).

- ``triplets(split)`` / ``queries(split)``: as CIRR's, for train, val and test (``dev`` is val);
- ``eval_sets(split)``: CIRR's one unit ``all``, whose notes list ``unseen_pairids``: the pair ids of the
  split's queries whose target's (shape, colour) pair never appears in train (the evaluation reports them apart).

Settings: CIRR's, and ``meta_file`` (default ``<root>/synthetic_meta.json``; a folder without one has no
unseen-pair notes).
"""
from __future__ import annotations

from pathlib import Path

from offset_cir.data.cirr import CIRR
from offset_cir.data.common import cached
from offset_cir.data.synthetic.meta import META_NAME, unseen_pairids_if_any


class Synthetic(CIRR):
    """The synthetic cluttered-scene benchmark (``offset synth``): CIRR layout, splits train/val/test with
    targets in every split, and the unseen-pair queries listed in ``synthetic_meta.json``."""

    name = "synthetic"
    default_protocol = "synthetic"
    split_aliases = {"dev": "val"}

    def __init__(self, root, meta_file=None, **settings):
        super().__init__(root, **settings)
        self.meta_path = Path(meta_file) if meta_file else self.root / META_NAME

    @cached
    def unseen_pairids(self, split: str) -> set[int] | None:
        """Pair ids of the unseen-pair queries of ``split`` from ``synthetic_meta.json`` (None without one)."""
        return unseen_pairids_if_any(self.meta_path, split)

    def unit_notes(self, split: str) -> dict:
        unseen = self.unseen_pairids(split)
        return {} if unseen is None else {"unseen_pairids": sorted(unseen)}
