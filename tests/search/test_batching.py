"""Micro-batching of query encodings (offset_cir.search.batching, Index.batch_queries): queries from several threads
share model calls, and each answer equals the one encoded alone."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import offset_cir
from offset_cir.search import Index, build_index
from offset_cir.search.batching import MicroBatcher
from offset_cir.testing.search import make_gallery

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    base = tmp_path_factory.mktemp("batch")
    paths = make_gallery(base / "g", n=10, size=64)
    torch.manual_seed(0)
    model = offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny")).eval()
    build_index(base / "idx", base / "g", model=model, progress=False, device="cpu", distributed=False)
    return Index.open(base / "idx", model=model), paths


def _in_threads(fn, args: list) -> list:
    """``fn(*a)`` for every ``a`` in ``args``, each in its own thread, released together; results in order."""
    out = [None] * len(args)
    start = threading.Barrier(len(args))

    def one(i):
        start.wait(10)
        out[i] = fn(*args[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_queries_share_model_calls_and_equal_their_unbatched_answers(tiny_index):
    """The tiny OFFSET: 8 queries (each its own image, mask and text) from 8 threads at once. Batched float32
    matrix products sum in another order than single ones: the features agree to ~1e-7, far inside 1e-5."""
    index, paths = tiny_index
    queries = [(str(p), f"make it red {i}", str(p.with_name(p.stem + "-segmask.png"))) for i, p in enumerate(paths[:8])]
    alone = np.stack([index.encode_query(*q) for q in queries])
    sizes = []
    index.batch_queries(max_batch=8, max_wait=0.5, on_batch=sizes.append)
    try:
        batched = np.stack(_in_threads(index.encode_query, queries))
    finally:
        index.close()
    assert sum(sizes) == 8 and max(sizes) > 1, sizes  # fewer model calls than queries
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)
    assert index.batcher is None
    np.testing.assert_allclose(index.encode_query(*queries[0]), alone[0], rtol=0, atol=0)  # unbatched again


def test_a_lone_request_does_not_wait_and_a_full_batch_goes_at_once():
    calls = []
    batcher = MicroBatcher(lambda items: (calls.append(list(items)), [x * 10 for x in items])[1], max_batch=3,
                           max_wait=5.0)
    try:
        t0 = time.monotonic()
        assert batcher.run(4) == 40  # nobody else announced: no 5 s wait
        assert time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        results = _in_threads(batcher.run, [(i,) for i in range(3)])
        assert time.monotonic() - t0 < 2.0  # three announced: the batch is full before the wait ends
    finally:
        batcher.close()
    assert results == [0, 10, 20]
    assert calls[0] == [4] and sorted(x for c in calls[1:] for x in c) == [0, 1, 2]
    assert all(len(c) <= 3 for c in calls)


def test_one_failing_request_fails_alone():
    def run(items):
        if "bad" in items:
            raise ValueError("bad item")
        return [x.upper() for x in items]

    batcher = MicroBatcher(run, max_batch=4, max_wait=1.0)

    def ask(x):
        try:
            return batcher.run(x)
        except ValueError as exc:
            return f"error: {exc}"

    try:
        results = _in_threads(ask, [("a",), ("bad",), ("c",), ("d",)])
    finally:
        batcher.close()
    assert results == ["A", "error: bad item", "C", "D"]


def test_a_request_whose_preparation_fails_does_not_hold_the_batch():
    calls = []
    batcher = MicroBatcher(lambda items: (calls.append(len(items)), list(items))[1], max_batch=4, max_wait=3.0)
    try:
        with pytest.raises(RuntimeError):
            with batcher.slot():
                raise RuntimeError("could not decode the upload")
        t0 = time.monotonic()
        assert batcher.run("x") == "x"
        assert time.monotonic() - t0 < 1.5  # the failed slot announced nothing any more
    finally:
        batcher.close()
    assert batcher.run("after close") == "after close"  # in the caller's thread
    assert calls == [1, 1]
