"""CIRCO's metrics as pure functions (offset_cir.eval.metrics), against examples worked by hand."""
from __future__ import annotations

import pytest

from offset_cir.eval.metrics import average_precision_at_k, map_per_aspect, mean_average_precision


def test_one_ground_truth():
    # the only ground truth at rank 3: precision@3 = 1/3, divided by min(K, 1) = 1
    assert average_precision_at_k(["a", "b", "g", "c"], ["g"], 5) == pytest.approx(1 / 3)
    assert average_precision_at_k(["g", "a"], ["g"], 5) == 1.0
    # at rank 3 but K = 2: not counted
    assert average_precision_at_k(["a", "b", "g"], ["g"], 2) == 0.0


def test_several_ground_truths_and_hits_past_k():
    ranked = ["g1", "x", "g2", "y", "z", "g3", "w"]
    gts = ["g1", "g2", "g3", "g4"]  # g4 is never retrieved
    # K = 5: hits at ranks 1 and 3 -> (1/1 + 2/3) / min(5, 4) = (5/3) / 4
    assert average_precision_at_k(ranked, gts, 5) == pytest.approx((1 + 2 / 3) / 4)
    # K = 10: g3 at rank 6 counts too -> (1 + 2/3 + 3/6) / min(10, 4)
    assert average_precision_at_k(ranked, gts, 10) == pytest.approx((1 + 2 / 3 + 1 / 2) / 4)
    # K = 2: only rank 1 -> 1 / min(2, 4) = 1/2 (the divisor is K when there are more ground truths than K)
    assert average_precision_at_k(ranked, gts, 2) == pytest.approx(1 / 2)
    # every ground truth first: AP = 1
    assert average_precision_at_k(["g2", "g1", "x"], ["g1", "g2"], 5) == 1.0


def test_mean_over_queries_in_percent():
    rankings = [["a", "t"], ["t", "b"], ["c", "d"]]
    truths = [["t"], ["t", "b"], ["t"]]
    # AP@2: 1/2, (1 + 1) / 2 = 1, 0 -> mean 0.5 -> 50 %
    assert mean_average_precision(rankings, truths, [2]) == {"mAP@2": pytest.approx(50.0)}
    # AP@1: 0, 1/min(1, 2) = 1, 0 -> 33.3 %
    assert mean_average_precision(rankings, truths, [1])["mAP@1"] == pytest.approx(100 / 3)


def test_per_aspect_counts_a_query_once_per_aspect():
    rankings = [["t"], ["x", "t"], ["x"]]
    truths = [["t"], ["t"], ["t"]]
    aspects = [["cardinality", "addition"], ["addition"], ["negation", "negation"]]
    got = map_per_aspect(rankings, truths, aspects, k=10)
    # AP@10 per query: 1, 1/2, 0
    assert got == {"mAP@10/addition": pytest.approx(75.0), "mAP@10/cardinality": pytest.approx(100.0),
                   "mAP@10/negation": pytest.approx(0.0)}
    assert list(got) == sorted(got)


def test_duplicates_and_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="ranking lists 'g' twice"):
        average_precision_at_k(["g", "g", "x"], ["g"], 5)
    with pytest.raises(ValueError, match="ground truths lists 'g' twice"):
        average_precision_at_k(["g", "x"], ["g", "g"], 5)
    with pytest.raises(ValueError, match="without ground truths"):
        average_precision_at_k(["g"], [], 5)
    with pytest.raises(ValueError, match="K >= 1"):
        average_precision_at_k(["g"], ["g"], 0)
    with pytest.raises(ValueError, match="2 rankings for 1"):
        mean_average_precision([["a"], ["b"]], [["a"]], [5])
