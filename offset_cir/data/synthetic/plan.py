"""Planning: the attributes of every image, the image sets, the CIRR records and per-query metadata (no pixels).

Splits are ``train``, ``val`` and ``test``; all have targets. In val and test every query has its own set of
6 images built around its target (reference, target, one image per attribute that differs from the target in
that attribute only), so R_subset measures fine distinctions. Train sets are shared by up to three queries
(as CIRR train sets are) to render fewer images; training does not use them.

Some (shape, colour) pairs are *held out*: no dominant object of the train split has one; a fraction of the
val and test queries have a held-out target (``unseen_pairids``). A plan is a pure function of the seed.
"""
from __future__ import annotations

import numpy as np

from offset_cir.data.synthetic.captions import make_caption
from offset_cir.data.synthetic.vocab import ATTRIBUTES, COLOURS, PATTERNS, SHAPES, SIZES, VOCAB

SPLITS = ("train", "val", "test")
# probability of a target changing 1, 2 or 3 attributes
N_CHANGES_P = (0.45, 0.35, 0.20)

_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def _key(a: dict) -> tuple:
    return tuple(a[k] for k in ATTRIBUTES)


class _Planner:
    """Draws the attributes of every set member and the queries of one split (no rendering)."""

    def __init__(self, rng: np.random.Generator, heldout: set[tuple[str, str]]):
        self.rng = rng
        self.heldout = heldout

    def pick(self, values):
        return values[int(self.rng.integers(len(values)))]

    def is_heldout(self, a: dict) -> bool:
        return (a["shape"], a["colour"]) in self.heldout

    def sample(self, heldout: bool | None) -> dict:
        """Random attributes; ``heldout`` True/False forces the (shape, colour) pair in/out of the held-out set."""
        if heldout:
            shape, colour = sorted(self.heldout)[int(self.rng.integers(len(self.heldout)))]
            return {"shape": shape, "colour": colour, "size": self.pick(list(SIZES)),
                    "pattern": self.pick(PATTERNS)}
        for _ in range(1000):
            a = {k: self.pick(VOCAB[k]) for k in ATTRIBUTES}
            if heldout is None or not self.is_heldout(a):
                return a
        raise RuntimeError("could not draw attributes outside the held-out pairs")

    def changed(self, base: dict, n: int, ok, taken: set) -> dict:
        """``base`` with exactly ``n`` attributes changed, accepted by ``ok`` and not in ``taken``."""
        for _ in range(1000):
            attrs = [ATTRIBUTES[i] for i in self.rng.permutation(len(ATTRIBUTES))[:n]]
            new = dict(base)
            for a in attrs:
                new[a] = self.pick([v for v in VOCAB[a] if v != base[a]])
            if ok(new) and _key(new) not in taken:
                return new
        raise RuntimeError(f"could not change {n} attribute(s) of {base}")

    def n_changes(self) -> int:
        return int(self.rng.choice([1, 2, 3], p=N_CHANGES_P))

    def neighbour(self, centre: dict, attr_order: list[str], ok, taken: set) -> tuple[dict, str]:
        """An image one attribute away from ``centre``, trying the attributes in ``attr_order`` first."""
        for a in attr_order + list(ATTRIBUTES):
            values = [v for v in VOCAB[a] if v != centre[a]]
            for i in self.rng.permutation(len(values)):
                new = dict(centre)
                new[a] = values[i]
                if ok(new) and _key(new) not in taken:
                    return new, a
        raise RuntimeError(f"no free neighbour of {centre}")

    def plan_set(self, n_queries: int, train: bool, unseen: bool) -> tuple[list[dict], list[tuple[int, int]]]:
        """Members (6 attribute dicts) and queries (reference index, target index) of one image set.

        The first target is the set's centre; further targets and the filler members are its one-attribute
        neighbours, each on a different attribute where possible. With one query (val, test) the set is
        reference, target and four neighbours of the target.
        """
        if train:
            ok_member = ok_ref = (lambda a: not self.is_heldout(a))
        else:
            ok_member = (lambda a: True)
            ok_ref = (lambda a: not self.is_heldout(a)) if unseen else (lambda a: True)
        centre = self.sample(heldout=True if unseen else False)
        members = [centre]
        taken = {_key(centre)}
        order = [ATTRIBUTES[i] for i in self.rng.permutation(len(ATTRIBUTES))]
        targets = [0]
        for _ in range(n_queries - 1):
            # extra train targets must keep held-out pairs out of train; neighbours may not be held out
            t, used = self.neighbour(centre, order, lambda a: not self.is_heldout(a), taken)
            if used in order:
                order.remove(used)
            members.append(t)
            taken.add(_key(t))
            targets.append(len(members) - 1)
        queries = []
        for ti in targets:
            ref = self.changed(members[ti], self.n_changes(), ok_ref, taken)
            members.append(ref)
            taken.add(_key(ref))
            queries.append((len(members) - 1, ti))
        while len(members) < 6:
            n, used = self.neighbour(centre, order, ok_member, taken)
            if used in order:
                order.remove(used)
            members.append(n)
            taken.add(_key(n))
        return members, queries


def choose_heldout(seed: int, n_pairs: int | None = None) -> list[tuple[str, str]]:
    """Held-out (shape, colour) pairs: one per shape, each with a different colour (so every shape and every
    colour is still seen in train)."""
    rng = np.random.default_rng([seed, 3])
    n = len(SHAPES) if n_pairs is None else n_pairs
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    return sorted((shapes[i % len(shapes)], colours[i % len(colours)]) for i in range(n))


def plan_benchmark(seed: int, counts: dict[str, int], unseen_fraction: float, train_queries_per_set: int,
                   heldout: set[tuple[str, str]]) -> dict:
    """Attributes of every image, the CIRR records and the per-query metadata of all splits (no pixels).

    Returns ``images`` (name -> split and attributes), ``records``, ``queries`` and ``unseen`` per split, and
    ``render``: one ``(relative path, attributes, seed words)`` per image, in naming order. Pair ids and set ids
    run on across the splits; image names are ``syn_<split>_<index>``."""
    images: dict[str, dict] = {}
    plan = {"images": images, "records": {}, "queries": {}, "unseen": {}, "render": []}
    pairid = set_id = 0
    for split in SPLITS:
        code = _SPLIT_CODE[split]
        rng = np.random.default_rng([seed, 1, code])
        planner = _Planner(rng, heldout)
        n = counts[split]
        train = split == "train"
        per_set = train_queries_per_set if train else 1
        unseen_flags = np.zeros(n, dtype=bool)
        if not train:
            unseen_flags[rng.permutation(n)[:int(round(unseen_fraction * n))]] = True
        records, queries_meta, unseen = [], [], []
        q = img_index = 0
        while q < n:
            members, queries = planner.plan_set(min(per_set, n - q), train, bool(unseen_flags[q]))
            # members in a random order, named in that order
            perm = rng.permutation(len(members))
            pos = {int(old): new for new, old in enumerate(perm)}
            names = []
            for new in range(len(members)):
                attrs = members[int(perm[new])]
                name = f"syn_{split}_{img_index:06d}"
                plan["render"].append((f"{split}/{name}.png", attrs, (seed, 2, code, img_index)))
                images[name] = {"split": split, **attrs}
                names.append(name)
                img_index += 1
            for ri, ti in queries:
                ref, tgt = members[ri], members[ti]
                caption, kept = make_caption(rng, ref, tgt)
                rname, tname = names[pos[ri]], names[pos[ti]]
                records.append({
                    "pairid": pairid, "reference": rname, "target_hard": tname, "target_soft": {tname: 1.0},
                    "caption": caption,
                    "img_set": {"id": set_id, "members": list(names), "reference_rank": pos[ri],
                                "target_rank": pos[ti]},
                })
                target_unseen = (tgt["shape"], tgt["colour"]) in heldout
                queries_meta.append({
                    "pairid": pairid, "reference": rname, "target": tname,
                    "changes": {a: [ref[a], tgt[a]] for a in ATTRIBUTES if ref[a] != tgt[a]},
                    "kept": kept, "unseen": target_unseen})
                if target_unseen:
                    unseen.append(pairid)
                pairid += 1
                q += 1
            set_id += 1
        plan["records"][split], plan["queries"][split], plan["unseen"][split] = records, queries_meta, unseen
    return plan
