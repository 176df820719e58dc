"""``offset_cir.evaluate``: the evaluation protocols of SPEC section 7.

The gallery of an evaluation unit is encoded once (``model.encode_target``), the queries in batches
(``model.encode_query``); each query batch is ranked with one matrix product against the gallery features,
the reference is excluded from its own ranking, and the metrics of :mod:`offset_cir.eval.metrics` are
computed from the ranks. Memory: the gallery feature matrix plus one batch of images and one row block of
scores; images are read from disk by the DataLoader as they are needed.

Protocols (the name is stamped into every result):

- ``fashioniq``: val, per category R@10/R@50 and their averages, galleries ``union`` and ``full``
  (``fashioniq-union`` / ``fashioniq-full``: one of them);
- ``shoes``: eval triplets, gallery the eval images, R@1/10/50 and mean;
- ``cirr-val`` (alias ``cirr``): R@1/5/10/50, R_subset@1/2/3 and (R@5+R_subset@1)/2;
- ``synthetic``: the CIRR metrics on the synthetic benchmark (test split), plus ``unseen_*`` metrics over the
  unseen-pair queries listed in ``synthetic_meta.json``;
- ``fashion200k-tirg`` (alias ``fashion200k``): R@1/10/50, a hit when the description equals the target's.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from offset_cir.data.common import EvalSet, ItemSeededDataset, collate
from offset_cir.device import choose_device, device_of
from offset_cir.errors import DatasetError, UserInputError
from offset_cir.eval import metrics as M
from offset_cir.stamps import environment

log = logging.getLogger(__name__)
TOP_K = 50


@dataclass(frozen=True)
class Protocol:
    name: str
    datasets: tuple[str, ...]
    split: str
    galleries: tuple[str, ...]
    ks: tuple[int, ...]
    subset_ks: tuple[int, ...] = ()
    per_unit: bool = False  # FashionIQ: metrics per category, then averaged
    query_transform: str = "eval"  # SPEC 4, A2: the release uses the training transform for FashionIQ queries
    description: str = ""
    # The checkpoint-selection rule (SPEC section 5): the R@K summed into ``selection_score`` (over the categories
    # when per_unit, plus every R_subset@K when subset_ks); None: every K of ks.
    selection_ks: tuple[int, ...] | None = None


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in [
    Protocol("fashioniq", ("fashioniq",), "val", ("union", "full"), (10, 50), per_unit=True, query_transform="train",
             selection_ks=(10,),
             description="FashionIQ val, per category R@10/R@50 and averages; galleries union and full"),
    Protocol("fashioniq-union", ("fashioniq",), "val", ("union",), (10, 50), per_unit=True, query_transform="train",
             selection_ks=(10,),
             description="FashionIQ val, gallery union (reference and target images of the category's val triplets)"),
    Protocol("fashioniq-full", ("fashioniq",), "val", ("full",), (10, 50), per_unit=True, query_transform="train",
             selection_ks=(10,),
             description="FashionIQ val, gallery full (every image of split.<cat>.val.json)"),
    Protocol("shoes", ("shoes",), "eval", ("all",), (1, 10, 50), selection_ks=(10, 50),
             description="Shoes eval triplets, gallery the eval images; R@1/10/50 and mean"),
    Protocol("cirr-val", ("cirr", "synthetic"), "val", ("all",), (1, 5, 10, 50), (1, 2, 3),
             description="CIRR val, gallery all val images; R@K, R_subset@K over set members minus the reference"),
    Protocol("synthetic", ("synthetic", "cirr"), "test", ("all",), (1, 5, 10, 50), (1, 2, 3),
             description="synthetic benchmark (CIRR layout and metrics), with unseen-pair metrics"),
    Protocol("fashion200k-tirg", ("fashion200k",), "test", ("all",), (1, 10, 50),
             description="Fashion200K test (TIRG): a hit when the retrieved image's description equals the target's"),
]}
ALIASES = {"cirr": "cirr-val", "fashion200k": "fashion200k-tirg", "shoes-eval": "shoes"}


def get_protocol(name: str | None, bench) -> Protocol:
    """Resolve a protocol name (None: the benchmark's default) and check it fits the benchmark."""
    name = name or bench.default_protocol
    key = ALIASES.get(name, name)
    if key not in PROTOCOLS:
        raise UserInputError(f"unknown protocol {name!r}; choose from {', '.join(sorted(PROTOCOLS) + sorted(ALIASES))}")
    proto = PROTOCOLS[key]
    if bench.name not in proto.datasets:
        raise UserInputError(f"protocol {proto.name} is for {' or '.join(proto.datasets)}, not {bench.name}")
    return proto


# ------------------------------------------------------------------------------------------ encoding
def _loader(ds, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                      persistent_workers=False)


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, leave=False, unit="batch")


class _Encoder:
    """Runs the model over the gallery and queries of ``bench``'s evaluation units (no_grad, eval mode).

    ``device``: None = the model's own device, else ``offset_cir.device.choose_device``'s rule."""

    def __init__(self, model, bench, batch_size: int, num_workers: int, device, progress: bool,
                 query_train_transform: bool = False, seed: int = 0):
        self.model, self.bench, self.batch_size, self.num_workers = model, bench, int(batch_size), int(num_workers)
        self.query_train_transform, self.seed = bool(query_train_transform), int(seed)
        self.device = device_of(model) if device is None else choose_device(device)
        self.uses_masks = bool(getattr(model, "uses_masks", True))
        self.preprocess = model.preprocess
        self.progress = progress

    def _masks(self, batch: dict, key: str):
        masks = batch[key]  # None when the Dataset was opened without masks
        return None if masks is None else masks.to(self.device)

    def gallery(self, es: EvalSet, ids: list[str]) -> torch.Tensor:
        ds = self.bench.image_dataset(ids, self.preprocess, self.uses_masks, source=f"{es.describe()}, gallery")
        loader = _loader(ds, self.batch_size, self.num_workers)
        out = []
        for batch in _progress(loader, len(loader), f"gallery {es.name}", self.progress):
            feats = self.model.encode_target(batch["image"].to(self.device), self._masks(batch, "mask"))
            _check_finite(feats, f"gallery features of {es.name}", batch["index"])
            out.append(feats.float())
        if not out:
            raise DatasetError(f"evaluation unit {es.name}: the gallery is empty")
        return torch.cat(out)

    def queries(self, es: EvalSet) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Query features in file order. With the training transform (A2) each query's random crop is drawn from
        a generator seeded by (``seed``, unit, query index) alone, so results repeat and do not depend on the
        number of DataLoader workers or the batch size (the caller's RNG state is left untouched)."""
        ds = self.bench.unit_query_dataset(es, self.preprocess, self.uses_masks, train=self.query_train_transform)
        if self.query_train_transform:
            ds = ItemSeededDataset(ds, self.seed, salt=es.name)
        loader = _loader(ds, self.batch_size, self.num_workers)
        for batch in _progress(loader, len(loader), f"queries {es.name}", self.progress):
            feats = self.model.encode_query(batch["ref_image"].to(self.device), self._masks(batch, "ref_mask"),
                                            batch["text"])
            _check_finite(feats, f"query features of {es.name}", batch["index"])
            yield batch["index"], feats.float()


def _check_finite(feats: torch.Tensor, what: str, index) -> None:
    """NaN scores compare false with everything and would rank every target first: refuse them."""
    bad = ~torch.isfinite(feats).all(dim=-1)
    if bool(bad.any()):
        rows = [int(i) for i in torch.as_tensor(index)[bad.cpu()][:5]]
        raise UserInputError(f"{what}: non-finite values (NaN/inf) for items {rows}; the model diverged or overflowed "
                             "(evaluate in fp32, or check the checkpoint)")


@dataclass
class _Ranked:
    """Per-gallery outputs of one evaluation unit."""

    ranks: dict[str, torch.Tensor]
    subset_ranks: torch.Tensor | None
    top: dict[str, list[list[str]]]
    subset_top: list[list[str]] | None


def rank_unit(enc: _Encoder, es: EvalSet, galleries: tuple[str, ...], top_k: int = TOP_K,
              subset: bool = False, subset_k: int = 3, need_top: bool = False) -> _Ranked:
    """Encode ``es``'s gallery once and rank every query against each named gallery."""
    missing = [g for g in galleries if g not in es.galleries]
    if missing:
        raise DatasetError(f"evaluation unit {es.name} has no gallery {missing[0]!r} (has {', '.join(es.galleries)})")
    ids = list(dict.fromkeys(i for g in galleries for i in es.galleries[g]))
    row = {x: i for i, x in enumerate(ids)}
    feats = enc.gallery(es, ids)
    nq = len(es.queries)
    plan = {}
    for g in galleries:
        pos = {x: j for j, x in enumerate(es.galleries[g])}
        if es.galleries[g] == ids:
            g_feats = feats
        else:
            gal_rows = torch.as_tensor([row[x] for x in es.galleries[g]], dtype=torch.long, device=feats.device)
            g_feats = feats.index_select(0, gal_rows)
        exclude = torch.as_tensor([pos.get(q.reference, -1) for q in es.queries], dtype=torch.long)
        if es.keys is not None:  # Fashion200K: positives are the images with the target's description
            codes: dict[str, int] = {}
            g_codes = torch.as_tensor([codes.setdefault(es.keys[x], len(codes)) for x in es.galleries[g]])
            q_codes = torch.as_tensor([codes.get(q.target_key if q.target_key is not None else es.keys.get(q.target, ""), -1)
                                       for q in es.queries])
            plan[g] = (g_feats, exclude, None, (g_codes.to(feats.device), q_codes))
        else:
            targets = torch.as_tensor([pos.get(q.target, -1) if q.target is not None else -1 for q in es.queries],
                                      dtype=torch.long)
            plan[g] = (g_feats, exclude, targets, None)
    if subset:
        m_rows, m_tgt, m_names = _subset_plan(es, row)
        m_rows, m_tgt = m_rows.to(feats.device), m_tgt.to(feats.device)
    ranks = {g: torch.empty(nq, dtype=torch.long) for g in galleries}
    top = {g: [None] * nq for g in galleries} if need_top else {}
    s_ranks = torch.empty(nq, dtype=torch.long) if subset else None
    s_top: list | None = [None] * nq if (subset and need_top) else None
    for index, q in enc.queries(es):
        dev_index = index.to(feats.device)
        for g, (g_feats, exclude, targets, codes) in plan.items():
            scores = q @ g_feats.T
            excluded = M.column_mask(exclude[index].to(feats.device), scores.shape[1])
            if codes is None:
                positives = M.column_mask(targets[index].to(feats.device), scores.shape[1])
            else:
                positives = codes[0][None, :] == codes[1][index].to(feats.device)[:, None]
            ranks[g][index] = M.first_hit_ranks(scores, positives, excluded).cpu()
            if need_top:
                names = es.galleries[g]
                for i, row_idx in zip(index.tolist(), M.topk_indices(scores, top_k, excluded).cpu().tolist()):
                    top[g][i] = [names[j] for j in row_idx if j >= 0]
        if subset:
            rows = m_rows[dev_index]  # [B, M]
            valid = rows >= 0
            sub = torch.einsum("bd,bmd->bm", q, feats[rows.clamp(min=0)])
            sub = sub.masked_fill(~valid, float("-inf"))
            positives = M.column_mask(m_tgt[dev_index], sub.shape[1])
            s_ranks[index] = M.first_hit_ranks(sub, positives, ~valid).cpu()
            if need_top:
                for i, row_idx in zip(index.tolist(), M.topk_indices(sub, subset_k, ~valid).cpu().tolist()):
                    s_top[i] = [m_names[i][j] for j in row_idx if j >= 0]
    return _Ranked(ranks, s_ranks, top, s_top)


def _subset_plan(es: EvalSet, row: dict[str, int]):
    """Set members minus the reference (in set order) as feature rows, and the target's position among them."""
    nq = len(es.queries)
    width = max((len(q.members) for q in es.queries), default=0)
    if width == 0:
        raise DatasetError(f"evaluation unit {es.name}: the queries have no image-set members (needed for R_subset)")
    rows = torch.full((nq, width), -1, dtype=torch.long)
    tgt = torch.full((nq,), -1, dtype=torch.long)
    names = []
    for i, q in enumerate(es.queries):
        members = [m for m in dict.fromkeys(q.members) if m != q.reference]
        for j, m in enumerate(members):
            if m not in row:
                raise DatasetError(f"query {q.pairid if q.pairid is not None else i}: set member {m} is not in the gallery")
            rows[i, j] = row[m]
        if q.target in members:
            tgt[i] = members.index(q.target)
        names.append(members)
    return rows, tgt, names


# ------------------------------------------------------------------------------------------ evaluate

def _model_stamp(model) -> dict:
    cfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        config = cfg.to_dict()
    elif isinstance(cfg, dict):
        config = dict(cfg)
    else:
        config = None if cfg is None else repr(cfg)
    backbone = getattr(cfg, "backbone", None) if cfg is not None and not isinstance(cfg, dict) else (cfg or {}).get("backbone")
    # "needs_masks": the result file's key since its first version (model.uses_masks), kept for readers of results
    return {"class": type(model).__name__, "backbone": backbone, "needs_masks": bool(getattr(model, "uses_masks", True)),
            "config": config}


def _put(metrics: dict[str, float], new: dict[str, float], unit: str) -> None:
    """Add ``new`` to ``metrics``; a key that is already there is a bug (one unit's result would replace another's)."""
    clash = sorted(set(new) & set(metrics))
    if clash:
        raise RuntimeError(f"evaluation unit {unit}: metric keys {clash} already set by another unit or gallery")
    metrics.update(new)


def evaluate(model, bench, protocol: str | None = None, split: str | None = None, batch_size: int = 32,
             num_workers: int = 0, save_rankings: str | Path | None = None, device=None,
             progress: bool = True, query_transform: str | None = None) -> dict:
    """Evaluate ``model`` on ``bench`` with ``protocol`` (SPEC section 7); returns a JSON-able stamped dict.

    ``save_rankings``: a JSON Lines file receiving, per query and gallery, the top-50 gallery ids.
    ``query_transform``: ``"eval"`` or ``"train"`` for the reference images (SPEC 4, A2); default the
    protocol's (``train`` for FashionIQ as in the release, ``eval`` elsewhere); galleries always use ``eval``.
    """
    proto = get_protocol(protocol, bench)
    query_transform = query_transform or proto.query_transform
    if query_transform not in ("eval", "train"):
        raise UserInputError(f"query_transform must be 'eval' or 'train', got {query_transform!r}")
    split = bench.canonical_split(split or proto.split)
    units = bench.eval_sets(split)
    for es in units:  # error messages about an item name the dataset, split and unit
        es.source = es.source or f"{bench.name} split {split}, unit {es.name}"
    names = [es.name for es in units]
    if len(set(names)) != len(names):
        raise DatasetError(f"{bench.name} split {split}: evaluation units must have distinct names, got {names}")
    for es in units:
        if any(q.target is None for q in es.queries):
            raise UserInputError(f"{bench.name} split {split} has no targets: it cannot be scored offline"
                                 + (" (use `offset submit cirr` for the CIRR test server)" if bench.name == "cirr" else ""))
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    enc = _Encoder(model, bench, batch_size, num_workers, device, progress,
                   query_train_transform=query_transform == "train")
    subset = bool(proto.subset_ks)
    need_top = save_rankings is not None
    metrics: dict[str, float] = {}
    unit_metrics: list[dict[str, float]] = []
    several = len(units) > 1 and not proto.per_unit  # per-unit protocols name the unit in every key already
    counts: dict[str, int] = {}
    sizes: dict[str, dict[str, int]] = {g: {} for g in proto.galleries}
    notes: dict = {}
    rankings_rows = []
    started = _dt.datetime.now(_dt.timezone.utc)
    try:
        with torch.no_grad():
            for es in units:
                r = rank_unit(enc, es, proto.galleries, subset=subset, need_top=need_top)
                counts[es.name] = len(es.queries)
                um: dict[str, float] = {}  # this unit's metrics
                for g in proto.galleries:
                    sizes[g][es.name] = len(es.galleries[g])
                    if proto.per_unit:
                        _put(um, M.recalls(r.ranks[g], proto.ks, f"{g}/{es.name}/R"), es.name)
                    else:
                        _put(um, M.recalls(r.ranks[g], proto.ks), es.name)
                if subset:
                    _put(um, M.recalls(r.subset_ranks, proto.subset_ks, "R_subset"), es.name)
                    _put(um, {"(R@5+R_subset@1)/2": (um["R@5"] + um["R_subset@1"]) / 2}, es.name)
                unseen = es.notes.get("unseen_pairids")
                if unseen is not None:
                    unseen = set(unseen)
                    sel = torch.as_tensor([q.pairid in unseen for q in es.queries], dtype=torch.bool)
                    counts[f"{es.name}/unseen" if len(units) > 1 else "unseen"] = int(sel.sum())
                    if sel.any():
                        _put(um, M.recalls(r.ranks["all"][sel], proto.ks, "unseen_R"), es.name)
                        if subset:
                            _put(um, M.recalls(r.subset_ranks[sel], proto.subset_ks, "unseen_R_subset"), es.name)
                            _put(um, {"unseen_(R@5+R_subset@1)/2": (um["unseen_R@5"] + um["unseen_R_subset@1"]) / 2},
                                 es.name)
                # Several units of a protocol that is not per unit: each unit's metrics under "<unit>/", and the
                # unprefixed headline the mean over units (as FashionIQ's "avg"); never one unit over another.
                _put(metrics, {(f"{es.name}/{k}" if several else k): v for k, v in um.items()}, es.name)
                unit_metrics.append(um)
                unit_notes = {k: v for k, v in es.notes.items() if k != "unseen_pairids"}
                if len(units) > 1:
                    if unit_notes:
                        notes[es.name] = unit_notes
                else:
                    notes.update(unit_notes)
                if need_top:
                    for g in proto.galleries:
                        for q, ids in zip(es.queries, r.top[g]):
                            rankings_rows.append({"unit": es.name, "gallery": g, "index": q.index, "pairid": q.pairid,
                                                  "reference": q.reference, "text": q.text, "target": q.target,
                                                  "top": ids})
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    if several:
        shared = [k for k in unit_metrics[0] if all(k in um for um in unit_metrics)]
        _put(metrics, {k: sum(um[k] for um in unit_metrics) / len(unit_metrics) for k in shared}, "mean over units")
    selection_ks = proto.selection_ks or proto.ks
    if proto.per_unit:
        for g in proto.galleries:
            for k in proto.ks:
                metrics[f"{g}/avg/R@{k}"] = sum(metrics[f"{g}/{u.name}/R@{k}"] for u in units) / len(units)
            metrics[f"{g}/avg"] = sum(metrics[f"{g}/avg/R@{k}"] for k in proto.ks) / len(proto.ks)
        selection = sum(metrics[f"{proto.galleries[0]}/{u.name}/R@{k}"] for u in units for k in selection_ks)
        selection_rule = (f"sum over categories of {' + '.join(f'R@{k}' for k in selection_ks)} "
                          f"({proto.galleries[0]} gallery)")
    elif subset:
        metrics["mean"] = sum(metrics[f"R@{k}"] for k in proto.ks) / len(proto.ks)
        selection = sum(metrics[f"R@{k}"] for k in selection_ks) + sum(metrics[f"R_subset@{k}"] for k in proto.subset_ks)
        selection_rule = (f"sum of R@{'/'.join(map(str, selection_ks))} and "
                          f"R_subset@{'/'.join(map(str, proto.subset_ks))}")
    else:
        metrics["mean"] = sum(metrics[f"R@{k}"] for k in proto.ks) / len(proto.ks)
        selection = sum(metrics[f"R@{k}"] for k in selection_ks)
        selection_rule = (" + ".join(f"R@{k}" for k in selection_ks) if proto.selection_ks
                          else "sum of " + "/".join(f"R@{k}" for k in selection_ks))
    result = {
        "protocol": proto.name,
        "protocol_description": proto.description,
        "dataset": bench.name,
        "root": str(bench.root), "clipseg_maps": getattr(bench, "clipseg_maps", None),
        "split": split,
        "gallery": list(proto.galleries),
        "gallery_size": sizes,
        "num_queries": counts,
        "reference_excluded": True,
        "query_transform": query_transform,
        "metrics": metrics,
        "selection_score": selection,
        "selection_rule": selection_rule,
        "model": _model_stamp(model),
        "versions": environment(),
        "timestamp": started.isoformat(timespec="seconds"),
        "notes": notes,
    }
    if need_top:
        path = Path(save_rankings)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            for row in rankings_rows:
                fh.write(json.dumps(row) + "\n")
        result["rankings_file"] = str(path)
    return result

