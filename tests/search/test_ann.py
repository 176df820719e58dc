"""Exact and approximate (FAISS) search engines and their recall measurement (offset_cir.search.ann)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from offset_cir.testing.search import PixelModel, make_gallery  # noqa: E402

from offset_cir.search import Index, build_index  # noqa: E402
from offset_cir.search import ann  # noqa: E402

faiss = pytest.importorskip("faiss")
faiss.omp_set_num_threads(1)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n, d, n_clusters=40, spread=0.35, seed=0):
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((n_clusters, d)))
    return _unit(centres[rng.integers(0, n_clusters, n)] + spread * rng.standard_normal((n, d)) / np.sqrt(d) * 4)


def test_choose_kind_thresholds():
    assert ann.choose_kind(10) == "exact"
    assert ann.choose_kind(99_999) == "exact" and ann.choose_kind(100_000) == "hnsw"
    assert ann.choose_kind(999_999) == "hnsw" and ann.choose_kind(1_000_000) == "ivf"
    assert ann.choose_kind(50, exact_max=20, hnsw_max=40) == "ivf"
    assert ann.ivf_nlist(1_000_000) == 1024 and ann.ivf_nlist(100) == 16


def test_exact_blocks_and_exclusion_match_full_sort():
    rng = np.random.default_rng(1)
    feats = _unit(rng.standard_normal((1000, 24))).astype(np.float16)
    q = _unit(rng.standard_normal((5, 24)))
    full = q @ feats.astype(np.float32).T
    blocked = ann.ExactSearch(feats, block_rows=77, cache_bytes=0)  # 13 blocks, no float32 copy
    assert blocked._cache is None
    s, r = blocked.search(q, 10)
    want = np.argsort(-full, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(r, want)
    np.testing.assert_allclose(s, np.take_along_axis(full, want, 1), rtol=1e-6)
    # one or three queries take the float16 scan + float32 re-scoring path: the same answer
    wide = ann.ExactSearch(feats, block_rows=400, cache_bytes=0)  # 104 candidates out of 400 rows per block
    for sub in (slice(0, 1), slice(1, 4)):
        s1, r1 = wide.search(q[sub], 10)
        np.testing.assert_array_equal(r1, want[sub])
        np.testing.assert_allclose(s1, np.take_along_axis(full, want, 1)[sub], rtol=1e-6)
    # float32 storage without a cache
    s4, r4 = ann.ExactSearch(feats.astype(np.float32), block_rows=100, cache_bytes=0).search(q[:2], 10)
    np.testing.assert_array_equal(r4, want[:2])
    # excluding each query's best row shifts the ranking by one
    s2, r2 = blocked.search(q, 10, exclude=[int(w[0]) for w in want])
    np.testing.assert_array_equal(r2, np.argsort(-full, axis=1, kind="stable")[:, 1:11])
    # more results than rows: padded with -1 / -inf
    small = ann.ExactSearch(feats[:3])
    s3, r3 = small.search(q[:1], 5)
    assert r3[0, 3:].tolist() == [-1, -1] and np.isneginf(s3[0, 3:]).all()


def test_neighbour_recall_by_hand():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, 9], [5, 6, 7, 8]])
    assert ann.neighbour_recall(approx, exact) == pytest.approx((2 / 4 + 4 / 4) / 2)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_build_faiss_reports_true_recall(kind):
    feats = _clustered(3000, 32).astype(np.float16)
    engine, rep = ann.build_faiss(feats, kind, n_queries=100, target_recall=0.9, progress=False)
    assert rep.kind == kind and rep.rows and rep.chosen == engine.param
    # recompute the reported recall independently with numpy on the same probe queries
    q = ann.sample_queries(feats, 100, seed=0)
    full = q @ feats.astype(np.float32).T
    exact_top = np.argsort(-full, axis=1)[:, :10]
    _, approx = engine.search(q, 10)
    mine = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.tolist(), exact_top.tolist())])
    assert rep.neighbour_recall == pytest.approx(mine, abs=0.011)  # ties at the 10th place may swap
    assert rep.neighbour_recall >= 0.9  # clustered data: the tuner reaches its target
    assert "recall@10" in rep.table() and "<- chosen" in rep.table()


def test_index_switches_to_faiss_and_prints_recall(tmp_path, capsys):
    """The library returns the tuning table (and logs it); printing it is the CLI's job (test_search_cli)."""
    root = tmp_path / "g"
    make_gallery(root, n=60, sub_every=0)
    m = PixelModel(dim=16)
    rep = build_index(tmp_path / "idx", root, model=m, exact_max=20, hnsw_max=1000, progress=False,
                      device="cpu", distributed=False)
    assert "recall@10" in rep.ann_table and "efSearch" in rep.ann_table
    assert "recall@10" not in capsys.readouterr().out  # library code does not print
    man = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert man["search"]["kind"] == "hnsw" and (tmp_path / "idx" / man["search"]["file"]).is_file()
    assert rep.search["recall_at_k"] == man["search"]["recall_at_k"]
    idx = Index.open(tmp_path / "idx", model=m)
    assert isinstance(idx.engine, ann.FaissSearch)
    exact = Index.open(tmp_path / "idx", model=m, exact=True)
    assert isinstance(exact.engine, ann.ExactSearch)
    ref = root / "img025.png"
    mask = ref.with_name(ref.stem + "-segmask.png")
    a = idx.search(ref, "green", k=5, mask=mask)
    b = exact.search(ref, "green", k=5, mask=mask)
    # a 60-image HNSW graph with efSearch >= 16 visits every node: the same ranking and scores up to fp16 storage
    assert [h.id for h in a] == [h.id for h in b]
    np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=2e-3)
    # an IVF gallery the same way
    build_index(tmp_path / "ivf", root, model=m, exact_max=20, hnsw_max=40, progress=False, device="cpu",
                distributed=False)
    assert json.loads((tmp_path / "ivf" / "manifest.json").read_text())["search"]["kind"] == "ivf"
    assert len(Index.open(tmp_path / "ivf", model=m).search(ref, "green", k=5, mask=mask)) == 5


def test_search_parameter_takes_effect():
    rng = np.random.default_rng(3)
    feats = _unit(rng.standard_normal((3000, 32))).astype(np.float16)
    engine, _ = ann.build_faiss(feats, "ivf", nlist=64, n_queries=50, progress=False)
    q = ann.sample_queries(feats, 50, seed=7)
    _, exact_rows = ann.ExactSearch(feats).search(q, 10)
    recalls = []
    for nprobe in (1, 64):
        engine.set_param(nprobe)
        recalls.append(ann.neighbour_recall(engine.search(q, 10)[1], exact_rows))
    assert recalls[0] < 0.7 and recalls[1] == pytest.approx(1.0, abs=0.02)  # nprobe = nlist is exhaustive
