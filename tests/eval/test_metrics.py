"""Metrics on hand-worked rankings (docs/model.md#evaluation): reference excluded, ties, subsets, k > gallery."""
from __future__ import annotations

import random

import pytest
import torch

from offset_cir.eval.metrics import (
    NO_HIT, first_hit_ranks, ranks_from_lists, recall_at_k, recalls, target_ranks, topk_indices,
)

# gallery a b c d e  (indices 0..4)
SCORES = torch.tensor([
    [0.9, 0.5, 0.7, 0.7, 0.1],   # ref a, target d: order c(tie, lower index) d b e -> rank 1
    [0.9, 0.5, 0.7, 0.7, 0.1],   # ref e, target c: order a c d b -> rank 1
    [0.2, 0.3, 0.4, 0.5, 0.6],   # ref b, target b (target is the reference) -> never a hit
    [0.0, 0.0, 0.0, 0.0, 0.0],   # all tied, ref c, target e: order a b d e -> rank 3
])
TARGETS = torch.tensor([3, 2, 1, 4])
REFS = torch.tensor([0, 4, 1, 2])


def test_target_ranks_by_hand():
    ranks = target_ranks(SCORES, TARGETS, REFS)
    assert ranks.tolist() == [1, 1, NO_HIT, 3]
    assert recall_at_k(ranks, 1) == 0.0
    assert recall_at_k(ranks, 2) == 50.0
    assert recall_at_k(ranks, 4) == 75.0
    # k larger than the gallery: every query whose target is a candidate is a hit, the other never
    assert recall_at_k(ranks, 50) == 75.0
    assert recalls(ranks, (1, 2)) == {"R@1": 0.0, "R@2": 50.0}


def test_reference_not_excluded_changes_rank():
    # row 0: a (0.9) now ahead; row 1: e was last anyway; row 2: e d c ahead of b; row 3: a b c d ahead of e
    assert target_ranks(SCORES, TARGETS).tolist() == [2, 1, 3, 4]


def test_target_outside_gallery():
    assert target_ranks(SCORES[:1], torch.tensor([-1]), torch.tensor([0])).tolist() == [NO_HIT]


def test_first_hit_several_positives():
    # Fashion200K: images b and d share the target description; ref a excluded
    pos = torch.tensor([[False, True, False, True, False]])
    exc = torch.tensor([[True, False, False, False, False]])
    assert first_hit_ranks(SCORES[:1], pos, exc).tolist() == [1]  # c (0.7) ahead of d (0.7, tie -> index)
    pos = torch.tensor([[False, True, True, False, False]])
    assert first_hit_ranks(SCORES[:1], pos, exc).tolist() == [0]  # c itself


def test_subset_with_reference_in_set():
    # CIRR set: members a c d e b x, reference a (in the set), target d; the reference is dropped -> 5 candidates
    ranked = [["a", "c", "d", "e", "b", "x"], ["x", "e", "a", "b", "c", "d"]]
    ranks = ranks_from_lists(ranked, ["d", "d"], ["a", "a"])
    assert ranks == [1, 4]
    assert recall_at_k(ranks, 1) == 0.0 and recall_at_k(ranks, 2) == 50.0 and recall_at_k(ranks, 5) == 100.0
    assert ranks_from_lists([["a", "b"]], ["a"], ["a"]) == [NO_HIT]


def test_topk_matches_rank_rule():
    excl = torch.zeros_like(SCORES, dtype=torch.bool)
    excl[torch.arange(4), REFS] = True
    top = topk_indices(SCORES, 3, excl)
    assert top.tolist() == [[2, 3, 1], [0, 2, 3], [4, 3, 2], [0, 1, 3]]
    # k larger than the gallery: capped, the excluded column padded out as -1
    top = topk_indices(SCORES, 10, excl)
    assert top.shape == (4, 5) and (top[:, -1] == -1).all() and (top[:, :4] >= 0).all()


def _slow_rank(scores, positives, excluded):
    order = sorted((j for j in range(len(scores)) if not excluded[j]), key=lambda j: -scores[j])  # stable
    for pos, j in enumerate(order):
        if positives[j]:
            return pos
    return NO_HIT


def test_against_slow_reference():
    rng = random.Random(0)
    for _ in range(30):
        b, n = rng.randint(1, 6), rng.randint(1, 12)
        scores = torch.tensor([[float(rng.randint(0, 3)) for _ in range(n)] for _ in range(b)])  # many ties
        pos = torch.rand(b, n) < 0.3
        exc = torch.rand(b, n) < 0.2
        got = first_hit_ranks(scores, pos, exc).tolist()
        want = [_slow_rank(scores[i].tolist(), pos[i].tolist(), exc[i].tolist()) for i in range(b)]
        assert got == want


def test_errors():
    with pytest.raises(ValueError):
        recall_at_k([], 1)
    with pytest.raises(ValueError):
        first_hit_ranks(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("n", [2, 4, 6, 12])
def test_chance_levels_count_the_reference_exclusion(n):
    # Independent computation: average the real ranking code's recall over every ordering of an n-image gallery
    # whose reference (column 0) is excluded and whose target is column 1: the target's rank is uniform over the
    # n - 1 candidates.
    import itertools

    from offset_cir.eval.metrics import chance_levels, chance_recall_at_k, column_mask

    orders = list(itertools.permutations(range(n))) if n <= 6 else [random.Random(s).sample(range(n), n) for s in range(2000)]
    scores = torch.tensor(orders, dtype=torch.float32)
    rows = scores.shape[0]
    ranks = first_hit_ranks(scores, column_mask(torch.full((rows,), 1), n), column_mask(torch.zeros(rows, dtype=torch.long), n))
    for k in (1, 3, 10):
        measured = recall_at_k(ranks, k)
        expect = chance_recall_at_k(n, k)
        assert expect == pytest.approx(100 * min(k, n - 1) / (n - 1))
        if n <= 6:  # every ordering: exact
            assert measured == pytest.approx(expect)
        else:  # 2000 random orderings: within 4 binomial standard deviations
            p = expect / 100
            assert abs(measured / 100 - p) <= 4 * (p * (1 - p) / rows) ** 0.5
    assert chance_levels(n)["R@1"] == pytest.approx(100 / (n - 1))
    assert chance_levels(n)["R_subset@1"] == pytest.approx(20.0)  # 6 set members minus the reference
