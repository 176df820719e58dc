"""``offset_cir.evaluate``: a model (or a training-free baseline) scored by a protocol (docs/model.md#evaluation).

The gallery of an evaluation unit is encoded once (``model.encode_target``; with a :class:`GalleryCache`, once per
model across evaluations), the queries in batches (``model.encode_query``); each query batch is ranked with one
matrix product against the gallery features, the reference is excluded from its own ranking unless the protocol
keeps it (CIRCO), and the metrics of :mod:`offset_cir.eval.metrics` are computed from the ranks or, for several
ground truths, from the top-50 lists. Memory: the gallery feature matrix plus one batch of images and one row block
of scores; images are read from disk by the DataLoader as they are needed.

The protocols, their names (stamped into every result) and what each reports: :mod:`offset_cir.eval.protocols`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from offset_cir import io
from offset_cir.data.common import EvalSet, ItemSeededDataset, collate
from offset_cir.device import choose_device, device_of
from offset_cir.errors import DatasetError, UserInputError
from offset_cir.eval import metrics as M
from offset_cir.eval.gallery_cache import GalleryCache
from offset_cir.eval.protocols import Protocol, protocol_for
from offset_cir.stamps import environment

log = logging.getLogger(__name__)
TOP_K = 50


# ------------------------------------------------------------------------------------------ encoding
def _loader(ds, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                      persistent_workers=False)


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, leave=False, unit="batch")


class Encoder:
    """Runs the model over the gallery and queries of ``bench``'s evaluation units (no_grad, eval mode).

    ``device``: None = the model's own device, else ``offset_cir.device.choose_device``'s rule. ``cache``: a
    :class:`GalleryCache` for this model (gallery features read from it, or encoded and stored)."""

    def __init__(self, model, bench, batch_size: int, num_workers: int, device, progress: bool,
                 query_train_transform: bool = False, seed: int = 0, cache: GalleryCache | None = None):
        self.model, self.bench, self.batch_size, self.num_workers = model, bench, int(batch_size), int(num_workers)
        self.query_train_transform, self.seed = bool(query_train_transform), int(seed)
        self.device = device_of(model) if device is None else choose_device(device)
        self.uses_masks = bool(getattr(model, "uses_masks", True))
        self.preprocess = model.preprocess
        self.progress = progress
        self.cache = cache

    def _masks(self, batch: dict, key: str):
        masks = batch[key]  # None when the Dataset was opened without masks
        return None if masks is None else masks.to(self.device)

    def gallery(self, es: EvalSet, ids: list[str]) -> torch.Tensor:
        if not ids:
            raise DatasetError(f"evaluation unit {es.name}: the gallery is empty")
        if self.cache is None:
            return torch.cat(list(self._encode_gallery(es, ids)))
        setting = {"image_size": getattr(self.preprocess, "image_size", None), "masks": self.uses_masks,
                   "mean": getattr(self.preprocess, "mean", None), "std": getattr(self.preprocess, "std", None)}
        feats = self.cache.features(ids, self._files, setting, lambda todo: self._encode_gallery(es, todo))
        return feats.to(self.device)

    def _files(self, image_id: str) -> list:
        files = [self.bench.image_path(image_id)]
        return files + [self.bench.mask_path(image_id)] if self.uses_masks else files

    def _encode_gallery(self, es: EvalSet, ids: list[str]) -> Iterator[torch.Tensor]:
        ds = self.bench.image_dataset(ids, self.preprocess, self.uses_masks, source=f"{es.describe()}, gallery")
        loader = _loader(ds, self.batch_size, self.num_workers)
        for batch in _progress(loader, len(loader), f"gallery {es.name}", self.progress):
            feats = self.model.encode_target(batch["image"].to(self.device), self._masks(batch, "mask"))
            _check_finite(feats, f"gallery features of {es.name}", batch["index"])
            yield feats.float()

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


def rank_unit(enc: Encoder, es: EvalSet, galleries: tuple[str, ...], top_k: int = TOP_K,
              subset: bool = False, subset_k: int = 3, need_top: bool = False,
              exclude_reference: bool = True) -> _Ranked:
    """Encode ``es``'s gallery once and rank every query against each named gallery (its reference excluded
    unless ``exclude_reference`` is False)."""
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
        exclude = torch.as_tensor([pos.get(q.reference, -1) if exclude_reference else -1 for q in es.queries],
                                  dtype=torch.long)
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

@contextlib.contextmanager
def evaluation_mode(model):
    """The block runs the model in evaluation mode without gradients; a model that was training trains again
    after it (also when the block fails)."""
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        if was_training and hasattr(model, "train"):
            model.train()


def _model_stamp(model) -> dict:
    cfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        config = cfg.to_dict()
    elif isinstance(cfg, dict):
        config = dict(cfg)
    else:
        config = None if cfg is None else repr(cfg)
    backbone = getattr(cfg, "backbone", None) if cfg is not None and not isinstance(cfg, dict) else (cfg or {}).get("backbone")
    # "needs_masks": the result file's key for model.uses_masks, which readers of results rely on
    return {"class": type(model).__name__, "backbone": backbone, "needs_masks": bool(getattr(model, "uses_masks", True)),
            "config": config, "baseline": getattr(model, "baseline", None)}


def _put(metrics: dict[str, float], new: dict[str, float], unit: str) -> None:
    """Add ``new`` to ``metrics``; a key that is already there is a bug (one unit's result would replace another's)."""
    clash = sorted(set(new) & set(metrics))
    if clash:
        raise RuntimeError(f"evaluation unit {unit}: metric keys {clash} already set by another unit or gallery")
    metrics.update(new)


def _units(bench, proto: Protocol, split: str) -> list[EvalSet]:
    """The evaluation units of ``split``, checked: distinct names, and targets to score against."""
    units = bench.eval_sets(split)
    for es in units:  # error messages about an item name the dataset, split and unit
        es.source = es.source or f"{bench.name} split {split}, unit {es.name}"
    names = [es.name for es in units]
    if len(set(names)) != len(names):
        raise DatasetError(f"{bench.name} split {split}: evaluation units must have distinct names, got {names}")
    for es in units:
        if any(q.target is None for q in es.queries):
            server = {"cirr": "cirr", "circo": "circo"}.get(bench.name)
            raise UserInputError(f"{bench.name} split {split} has no targets: it cannot be scored offline"
                                 + (f" (use `offset submit {server}` for its test server)" if server else ""))
    return units


def _recall_metrics(proto: Protocol, r: _Ranked, es: EvalSet) -> dict[str, float]:
    """R@K per gallery (per category for FashionIQ), and R_subset@K with CIRR's headline when the protocol has them."""
    um: dict[str, float] = {}
    for g in proto.galleries:
        _put(um, M.recalls(r.ranks[g], proto.ks, f"{g}/{es.name}/R" if proto.per_unit else "R"), es.name)
    if proto.subset_ks:
        _put(um, M.recalls(r.subset_ranks, proto.subset_ks, "R_subset"), es.name)
        _put(um, {"(R@5+R_subset@1)/2": (um["R@5"] + um["R_subset@1"]) / 2}, es.name)
    return um


def _map_metrics(proto: Protocol, r: _Ranked, es: EvalSet) -> dict[str, float]:
    """Several ground truths (CIRCO): mAP@K over them, R@K of the target, mAP@``aspect_k`` per semantic aspect."""
    (g,) = proto.galleries
    lists, truths = r.top[g], [q.ground_truths or (q.target,) for q in es.queries]
    um = M.mean_average_precision(lists, truths, proto.ks)
    _put(um, M.recalls(r.ranks[g], proto.ks), es.name)
    if any(q.aspects for q in es.queries):
        _put(um, M.map_per_aspect(lists, truths, [q.aspects for q in es.queries], proto.aspect_k), es.name)
    return um


def _unseen_metrics(proto: Protocol, r: _Ranked, es: EvalSet, um: dict[str, float]) -> int | None:
    """Add the metrics over the unit's unseen-pair queries (synthetic benchmark) to ``um``; their count, or None."""
    unseen = es.notes.get("unseen_pairids")
    if unseen is None:
        return None
    unseen = set(unseen)
    sel = torch.as_tensor([q.pairid in unseen for q in es.queries], dtype=torch.bool)
    if sel.any():
        _put(um, M.recalls(r.ranks["all"][sel], proto.ks, "unseen_R"), es.name)
        if proto.subset_ks:
            _put(um, M.recalls(r.subset_ranks[sel], proto.subset_ks, "unseen_R_subset"), es.name)
            _put(um, {"unseen_(R@5+R_subset@1)/2": (um["unseen_R@5"] + um["unseen_R_subset@1"]) / 2}, es.name)
    return int(sel.sum())


def _headline(proto: Protocol, metrics: dict[str, float], units: list[EvalSet]) -> tuple[float, str]:
    """Add the protocol's averages to ``metrics``; return the selection score and its rule (docs/model.md#training)."""
    selection_ks = proto.selection_ks or proto.ks
    if proto.metric == "map":
        return (sum(metrics[f"mAP@{k}"] for k in selection_ks),
                "sum of " + "/".join(f"mAP@{k}" for k in selection_ks))
    if proto.per_unit:
        for g in proto.galleries:
            for k in proto.ks:
                metrics[f"{g}/avg/R@{k}"] = sum(metrics[f"{g}/{u.name}/R@{k}"] for u in units) / len(units)
            metrics[f"{g}/avg"] = sum(metrics[f"{g}/avg/R@{k}"] for k in proto.ks) / len(proto.ks)
        selection = sum(metrics[f"{proto.galleries[0]}/{u.name}/R@{k}"] for u in units for k in selection_ks)
        return selection, (f"sum over categories of {' + '.join(f'R@{k}' for k in selection_ks)} "
                           f"({proto.galleries[0]} gallery)")
    metrics["mean"] = sum(metrics[f"R@{k}"] for k in proto.ks) / len(proto.ks)
    selection = sum(metrics[f"R@{k}"] for k in selection_ks)
    if proto.subset_ks:
        selection += sum(metrics[f"R_subset@{k}"] for k in proto.subset_ks)
        return selection, (f"sum of R@{'/'.join(map(str, selection_ks))} and "
                           f"R_subset@{'/'.join(map(str, proto.subset_ks))}")
    return selection, (" + ".join(f"R@{k}" for k in selection_ks) if proto.selection_ks
                       else "sum of " + "/".join(f"R@{k}" for k in selection_ks))


def _rankings_rows(es: EvalSet, r: _Ranked, galleries: tuple[str, ...]) -> list[dict]:
    return [{"unit": es.name, "gallery": g, "index": q.index, "pairid": q.pairid, "reference": q.reference,
             "text": q.text, "target": q.target, "top": ids}
            for g in galleries for q, ids in zip(es.queries, r.top[g])]


@dataclass
class _Tally:
    """What the units of one evaluation add up to."""

    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    unit_metrics: list[dict[str, float]] = dataclasses.field(default_factory=list)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: dict = dataclasses.field(default_factory=dict)
    rows: list[dict] = dataclasses.field(default_factory=list)


def _score_units(enc: Encoder, proto: Protocol, units: list[EvalSet], keep_rows: bool) -> _Tally:
    """Rank every unit and score it; several units of a protocol that is not per unit keep each unit's metrics under
    ``"<unit>/"`` and the unprefixed headline the mean over units (as FashionIQ's "avg"), never one over another."""
    t = _Tally()
    several = len(units) > 1 and not proto.per_unit  # per-unit protocols name the unit in every key already
    for es in units:
        r = rank_unit(enc, es, proto.galleries, top_k=max(TOP_K, *proto.ks), subset=bool(proto.subset_ks),
                      need_top=keep_rows or proto.metric == "map", exclude_reference=proto.exclude_reference)
        t.counts[es.name] = len(es.queries)
        um = _map_metrics(proto, r, es) if proto.metric == "map" else _recall_metrics(proto, r, es)
        n_unseen = _unseen_metrics(proto, r, es, um)
        if n_unseen is not None:
            t.counts[f"{es.name}/unseen" if len(units) > 1 else "unseen"] = n_unseen
        _put(t.metrics, {(f"{es.name}/{k}" if several else k): v for k, v in um.items()}, es.name)
        t.unit_metrics.append(um)
        unit_notes = {k: v for k, v in es.notes.items() if k != "unseen_pairids"}
        if len(units) == 1:
            t.notes.update(unit_notes)
        elif unit_notes:
            t.notes[es.name] = unit_notes
        if keep_rows:
            t.rows += _rankings_rows(es, r, proto.galleries)
    if several:
        shared = [k for k in t.unit_metrics[0] if all(k in um for um in t.unit_metrics)]
        _put(t.metrics, {k: sum(um[k] for um in t.unit_metrics) / len(t.unit_metrics) for k in shared},
             "mean over units")
    return t


def evaluate(model, bench, protocol: str | None = None, split: str | None = None, batch_size: int = 32,
             num_workers: int = 0, save_rankings: str | Path | None = None, device=None,
             progress: bool = True, query_transform: str | None = None,
             gallery_cache: GalleryCache | None = None) -> dict:
    """Evaluate ``model`` on ``bench`` with ``protocol`` (docs/model.md#evaluation); returns a JSON-able stamped dict.

    ``model``: an OFFSET model, or anything with its ``encode_query`` / ``encode_target`` / ``preprocess``
    (an ONNX encoder, a :class:`~offset_cir.model.baseline.BaselineEncoder`: its ``baseline`` is stamped).
    ``save_rankings``: a JSON Lines file receiving, per query and gallery, the top-50 gallery ids.
    ``query_transform``: ``"eval"`` or ``"train"`` for the reference images (docs/model.md#a2); default the
    protocol's (``train`` for FashionIQ as in the release, ``eval`` elsewhere); galleries always use ``eval``.
    ``gallery_cache``: gallery features of this model stored and reused across evaluations.
    """
    proto = protocol_for(protocol, bench)
    query_transform = query_transform or proto.query_transform
    if query_transform not in ("eval", "train"):
        raise UserInputError(f"query_transform must be 'eval' or 'train', got {query_transform!r}")
    split = bench.canonical_split(split or proto.split)
    units = _units(bench, proto, split)
    started = _dt.datetime.now(_dt.timezone.utc)
    with evaluation_mode(model):
        enc = Encoder(model, bench, batch_size, num_workers, device, progress,
                      query_train_transform=query_transform == "train", cache=gallery_cache)
        tally = _score_units(enc, proto, units, keep_rows=save_rankings is not None)
    selection, selection_rule = _headline(proto, tally.metrics, units)
    result = {
        "protocol": proto.name,
        "protocol_description": proto.description,
        "dataset": bench.name,
        "root": str(bench.root), "clipseg_maps": getattr(bench, "clipseg_maps", None),
        "split": split,
        "gallery": list(proto.galleries),
        "gallery_size": {g: {es.name: len(es.galleries[g]) for es in units} for g in proto.galleries},
        "num_queries": tally.counts,
        "reference_excluded": proto.exclude_reference,
        "query_transform": query_transform,
        "baseline": getattr(model, "baseline", None),
        "metrics": tally.metrics,
        "selection_score": selection,
        "selection_rule": selection_rule,
        "model": _model_stamp(model),
        "versions": environment(),
        "timestamp": started.isoformat(timespec="seconds"),
        "notes": tally.notes,
    }
    if gallery_cache is not None:
        used = gallery_cache.last
        result["gallery_features"] = {"cache": str(gallery_cache.folder), "chunks_reused": used.reused,
                                      "chunks_encoded": used.encoded, "images_encoded": used.images_encoded}
    if save_rankings is not None:
        path = Path(save_rankings)
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_jsonl(path, tally.rows, sort_keys=False)
        result["rankings_file"] = str(path)
    return result
