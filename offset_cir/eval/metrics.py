"""Retrieval metrics as pure functions (docs/model.md#evaluation).

Rank rule used everywhere: candidates are ordered by descending score; equal scores keep gallery order (the
candidate with the lower index comes first), i.e. a stable sort. Excluded candidates (the reference) are
removed before ranking. The rank of a query is the 0-based position of its first positive candidate
(the target, or for Fashion200K any image whose description equals the target's); a query with no positive
candidate left gets rank ``NO_HIT`` and is a miss at every k. Recall@k is the percentage of queries with
rank < k, so k larger than the gallery counts every query whose positive is in the gallery.

Several ground truths (CIRCO): :func:`average_precision_at_k` on a retrieved list, :func:`mean_average_precision`
and :func:`map_per_aspect` over queries; a list naming an image twice is refused.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

NO_HIT = torch.iinfo(torch.int64).max


def first_hit_ranks(scores: torch.Tensor, positives: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of the first positive per row under the rank rule.

    scores [B, N] float; positives [B, N] bool; excluded [B, N] bool or None. Returns LongTensor [B]
    (``NO_HIT`` where a row has no positive left after exclusion).
    """
    if scores.shape != positives.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} differ")
    n = scores.shape[1]
    keep = torch.ones_like(positives) if excluded is None else ~excluded
    pos = positives & keep
    has = pos.any(dim=1)
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    best = torch.where(pos, scores, neg_inf).max(dim=1).values  # best positive score
    idx = torch.arange(n, device=scores.device).expand_as(scores)
    # first (lowest-index) positive among those with the best score
    at_best = pos & (scores == best[:, None])
    first = torch.where(at_best, idx, torch.full_like(idx, n)).min(dim=1).values
    ahead = keep & ((scores > best[:, None]) | ((scores == best[:, None]) & (idx < first[:, None])))
    ranks = ahead.sum(dim=1)
    return torch.where(has, ranks, torch.full_like(ranks, NO_HIT))


def column_mask(columns: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] bool with row i true at ``columns[i]`` (no column where it is -1)."""
    columns = columns.long()
    mask = torch.zeros(columns.shape[0], n, dtype=torch.bool, device=columns.device)
    ok = columns >= 0
    mask[torch.nonzero(ok).flatten(), columns[ok]] = True
    return mask


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of one target column per row. targets [B] long (-1: target not in the gallery -> ``NO_HIT``);
    exclude [B] long (-1: nothing excluded), typically the reference's column."""
    n = scores.shape[1]
    excluded = None if exclude is None else column_mask(exclude.to(scores.device), n)
    return first_hit_ranks(scores, column_mask(targets.to(scores.device), n), excluded)


def recall_at_k(ranks: torch.Tensor | Sequence[int], k: int) -> float:
    """Percentage of queries whose rank is below k (docs/model.md#evaluation)."""
    ranks = torch.as_tensor(ranks, dtype=torch.long)
    if ranks.numel() == 0:
        raise ValueError("recall of zero queries is undefined")
    return 100.0 * (ranks < k).double().mean().item()


def recalls(ranks, ks: Iterable[int], prefix: str = "R") -> dict[str, float]:
    """``{f"{prefix}@{k}": recall_at_k(ranks, k)}`` for every k: ``"R@10"``, ``"R_subset@1"``,
    ``"dress/union/R@10"`` (the keys of every result of :func:`offset_cir.evaluate`)."""
    return {f"{prefix}@{k}": recall_at_k(ranks, k) for k in ks}


def ranks_from_lists(rankings: Sequence[Sequence[str]], targets: Sequence[str], references: Sequence[str | None]) -> list[int]:
    """Ranks from already ordered candidate lists (saved rankings, hand-worked examples): the reference is
    dropped from its list, then the rank is the target's position (``NO_HIT`` when absent)."""
    out = []
    for ranked, tgt, ref in zip(rankings, targets, references, strict=True):
        kept = [c for c in ranked if c != ref]
        out.append(kept.index(tgt) if tgt in kept else NO_HIT)
    return out


def topk_indices(scores: torch.Tensor, k: int, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k columns per row under the rank rule (descending score, ties in gallery order: a stable sort, so
    the lists agree with :func:`first_hit_ranks`); excluded columns are never returned; k is capped at the
    gallery size and rows with fewer candidates left than k are padded with -1."""
    if excluded is not None:
        scores = scores.masked_fill(excluded, float("-inf"))
    k = min(k, scores.shape[1])
    vals, idx = torch.sort(scores, dim=1, descending=True, stable=True)
    vals, idx = vals[:, :k], idx[:, :k]
    if excluded is not None:
        idx = torch.where(torch.isneginf(vals), torch.full_like(idx, -1), idx)
    return idx


def chance_recall_at_k(gallery_size: int, k: int, reference_excluded: bool = True) -> float:
    """R@k (in %) of a uniformly random ranking: the target is one of the ``n`` candidates, ``n`` = the gallery
    minus the excluded reference (docs/model.md#evaluation), so P(rank <= k) = min(k, n) / n."""
    n = int(gallery_size) - (1 if reference_excluded else 0)
    if n < 1:
        raise ValueError(f"a gallery of {gallery_size} images leaves no candidate")
    return 100.0 * min(int(k), n) / n


def chance_levels(gallery_size: int, subset_size: int = 6) -> dict[str, float]:
    """The chance levels of the CIRR-style metrics: R@1 and R@10 over the gallery, R_subset@1 over an image set
    of ``subset_size`` members (CIRR: 6); the reference is excluded from both."""
    return {"R@1": chance_recall_at_k(gallery_size, 1), "R@10": chance_recall_at_k(gallery_size, 10),
            "R_subset@1": chance_recall_at_k(subset_size, 1)}


# --------------------------------------------------------------------------------------- several ground truths
def _unique(items: Sequence, what: str) -> None:
    seen: set = set()
    for item in items:
        if item in seen:
            raise ValueError(f"{what} lists {item!r} twice; a ranking and a set of ground truths hold each image once")
        seen.add(item)


def average_precision_at_k(ranked: Sequence, relevant: Sequence, k: int) -> float:
    """AP@K as CIRCO defines it: the sum, over the ranks r <= K whose item is relevant, of precision@r, divided by
    min(K, number of relevant items); a fraction in [0, 1]. ``ranked`` is the retrieved list, best first (only its
    first K count); ``relevant`` every ground truth. A list holding an item twice is refused (it would count a
    ground truth twice), as is an empty ``relevant`` or K < 1."""
    if k < 1:
        raise ValueError(f"AP@K needs K >= 1, got {k}")
    if not relevant:
        raise ValueError("AP@K of a query without ground truths is undefined")
    _unique(ranked, "the ranking")
    _unique(relevant, "the ground truths")
    wanted = set(relevant)
    hits, total = 0, 0.0
    for r, item in enumerate(ranked[:k], start=1):
        if item in wanted:
            hits += 1
            total += hits / r
    return total / min(k, len(wanted))


def mean_average_precision(rankings: Sequence[Sequence], relevants: Sequence[Sequence], ks: Iterable[int],
                           prefix: str = "mAP") -> dict[str, float]:
    """``{f"{prefix}@{k}": mean AP@k over the queries, in %}`` (CIRCO's mAP@K)."""
    if len(rankings) != len(relevants):
        raise ValueError(f"{len(rankings)} rankings for {len(relevants)} sets of ground truths")
    if not rankings:
        raise ValueError("mAP of zero queries is undefined")
    return {f"{prefix}@{k}": 100.0 * sum(average_precision_at_k(r, g, k) for r, g in zip(rankings, relevants))
            / len(rankings) for k in ks}


def map_per_aspect(rankings: Sequence[Sequence], relevants: Sequence[Sequence], aspects: Sequence[Sequence[str]],
                   k: int = 10) -> dict[str, float]:
    """mAP@k (in %) over the queries of each semantic aspect (a query counts once for each of its aspects), keyed
    ``"mAP@<k>/<aspect>"``, aspects in sorted order."""
    groups: dict[str, list[int]] = {}
    for i, names in enumerate(aspects):
        for name in dict.fromkeys(names):
            groups.setdefault(name, []).append(i)
    out = {}
    for name in sorted(groups):
        rows = groups[name]
        (value,) = mean_average_precision([rankings[i] for i in rows], [relevants[i] for i in rows], [k]).values()
        out[f"mAP@{k}/{name}"] = value
    return out
