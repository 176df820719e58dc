"""Nearest-neighbour search over L2-normalised gallery features (score = cosine, docs/model.md#scoring).

Two engines with one interface, ``search(queries [B,D] float32, k) -> (scores [B,k], rows [B,k])``:

* :class:`ExactSearch`: matrix product over the stored features, in blocks so a memory-mapped float16 gallery
  never has to be held as float32 all at once.
* :class:`FaissSearch`: a FAISS index (HNSW for mid-sized galleries, IVF for large ones, both with float16
  scalar-quantised storage and inner-product metric), read from / written to a file.

:func:`choose_kind` picks the engine from the gallery size; :func:`build_faiss` builds one and tunes its search
parameter (``efSearch`` or ``nprobe``) against exact search, reporting recall@k for every value tried.
Rows with a score of ``-inf`` / row ``-1`` mean "fewer than k results".
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

#: galleries smaller than this are searched exactly
EXACT_MAX = 100_000
#: galleries from EXACT_MAX up to this size use HNSW; larger ones IVF
HNSW_MAX = 1_000_000
#: recall@10 the tuner tries to reach before it stops raising the search parameter
TARGET_RECALL = 0.95


def choose_kind(n: int, exact_max: int = EXACT_MAX, hnsw_max: int = HNSW_MAX) -> str:
    """``"exact"`` below ``exact_max`` images, ``"hnsw"`` below ``hnsw_max``, ``"ivf"`` above."""
    if n < exact_max:
        return "exact"
    if n < hnsw_max:
        return "hnsw"
    return "ivf"


def _merge_rows(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, rows: np.ndarray, k: int):
    """Merge candidate scores ``s`` [B,c] of gallery ``rows`` [B,c] into the running top-k (score descending,
    ties by row ascending, so results are deterministic)."""
    cs = np.concatenate([best_s, s.astype(np.float32, copy=False)], axis=1)
    ci = np.concatenate([best_i, rows.astype(np.int64, copy=False)], axis=1)
    order = np.lexsort((ci, -cs), axis=1)[:, :k]
    return np.take_along_axis(cs, order, axis=1), np.take_along_axis(ci, order, axis=1)


def _topk_merge(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, offset: int, k: int):
    """Merge block scores ``s`` [B,m] (rows offset..offset+m) into the running top-k."""
    m = s.shape[1]
    kk = min(k, m)
    if kk < m:
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
    else:
        part = np.broadcast_to(np.arange(m), (s.shape[0], m))
    return _merge_rows(best_s, best_i, np.take_along_axis(s, part, axis=1), part + offset, k)


class ExactSearch:
    """Exact inner-product search by matrix product over ``features`` [N,D] (any float dtype, memmap ok).

    Small galleries keep a float32 copy. Larger float16 galleries are scanned in blocks without one: for a few
    queries a float16 matrix-vector product picks ``4k+64`` candidates per block whose scores are then recomputed
    in float32 (an item is missed only if more than 4k+64 items of one block sit within float16 rounding, about
    1e-3, of the k-th score); for many queries each block is converted to float32 once and multiplied.
    """

    kind = "exact"

    def __init__(self, features: np.ndarray, block_rows: int = 65536, cache_bytes: int = 512 << 20):
        self.features = features
        self.block_rows = int(block_rows)
        self._cache = None
        n, d = features.shape
        if n * d * 4 <= cache_bytes:  # small gallery: keep a float32 copy for one-shot matmul
            self._cache = np.ascontiguousarray(features, dtype=np.float32)

    @property
    def ntotal(self) -> int:
        return int(self.features.shape[0])

    def search(self, queries: np.ndarray, k: int, exclude: list[int | None] | None = None):
        q = np.ascontiguousarray(queries, dtype=np.float32)
        b = q.shape[0]
        n = self.ntotal
        extra = 1 if exclude is not None else 0
        kk = min(k + extra, n)
        best_s = np.full((b, 0), -np.inf, dtype=np.float32)
        best_i = np.full((b, 0), -1, dtype=np.int64)
        if self._cache is not None:
            best_s, best_i = _topk_merge(best_s, best_i, q @ self._cache.T, 0, kk)
        else:
            best_s, best_i = self._scan(q, kk, best_s, best_i)
        return _finish(best_s, best_i, k, exclude)

    def _scan(self, q: np.ndarray, kk: int, best_s, best_i):
        import warnings

        import torch

        with warnings.catch_warnings():  # a read-only memory map: torch only reads it
            warnings.simplefilter("ignore", UserWarning)
            feats = torch.from_numpy(np.asarray(self.features))
        qf = torch.from_numpy(q)
        few = feats.dtype == torch.float16 and q.shape[0] <= 4
        q16 = qf.to(torch.float16)
        rows_s: list = [None] * q.shape[0]
        rows_i: list = [None] * q.shape[0]
        with torch.inference_mode():
            for start in range(0, self.ntotal, self.block_rows):
                block = feats[start:start + self.block_rows]
                m = block.shape[0]
                if few:
                    c = min(m, 4 * kk + 64)
                    for j in range(q.shape[0]):
                        # float16 matrix-vector product (a float16 GEMM with few columns is far slower on CPU)
                        cand = torch.topk(torch.mv(block, q16[j]), c).indices
                        exact = torch.mv(torch.index_select(block, 0, cand).float(), qf[j])
                        bs, bi = _merge_rows(best_s[j:j + 1], best_i[j:j + 1], exact.numpy()[None],
                                             cand.numpy()[None] + start, kk)
                        rows_s[j], rows_i[j] = bs[0], bi[0]
                    best_s, best_i = np.stack(rows_s), np.stack(rows_i)
                else:
                    scores = qf @ block.to(qf.dtype).T  # [B, m]
                    top = torch.topk(scores, min(m, kk), dim=1)
                    best_s, best_i = _merge_rows(best_s, best_i, top.values.numpy(), top.indices.numpy() + start,
                                                 kk)
        return best_s, best_i


def _finish(scores: np.ndarray, rows: np.ndarray, k: int, exclude):
    """Drop excluded rows (one per query, or None), pad to k with -inf / -1."""
    b = scores.shape[0]
    out_s = np.full((b, k), -np.inf, dtype=np.float32)
    out_i = np.full((b, k), -1, dtype=np.int64)
    for r in range(b):
        ex = exclude[r] if exclude is not None else None
        keep = [(s, i) for s, i in zip(scores[r], rows[r]) if i >= 0 and i != ex][:k]
        for j, (s, i) in enumerate(keep):
            out_s[r, j] = s
            out_i[r, j] = i
    return out_s, out_i


@dataclass
class TuneRow:
    param: int
    recall: float
    ms_per_query: float


@dataclass
class FaissReport:
    """What :func:`build_faiss` measured: one row per search-parameter value tried."""

    kind: str
    factory: str
    param_name: str
    chosen: int
    neighbour_recall: float  # of the chosen parameter (the JSON key stays "recall_at_k")
    k: int
    n_queries: int
    build_s: float
    rows: list[TuneRow] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{self.kind} ({self.factory}): recall@{self.k} of approximate vs exact search, "
                 f"{self.n_queries} queries",
                 f"{self.param_name:>10} | recall@{self.k} | ms/query"]
        for r in self.rows:
            mark = "  <- chosen" if r.param == self.chosen else ""
            lines.append(f"{r.param:>10} | {r.recall:9.4f} | {r.ms_per_query:8.3f}{mark}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "kind": self.kind, "factory": self.factory, "param_name": self.param_name, "param": self.chosen,
            "recall_at_k": self.neighbour_recall, "k": self.k, "n_queries": self.n_queries, "build_s": self.build_s,
            "tuning": [[r.param, r.recall, r.ms_per_query] for r in self.rows],
        }


class FaissSearch:
    """A FAISS inner-product index with its search parameter (``efSearch`` for HNSW, ``nprobe`` for IVF)."""

    def __init__(self, index, kind: str, param: int):
        self.index = index
        self.kind = kind
        self.set_param(param)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def set_param(self, value: int) -> None:
        self.param = int(value)
        if self.kind not in ("hnsw", "ivf"):
            raise ValueError(f"unknown FAISS index kind {self.kind!r}")

    def _params(self, k: int):
        """Per-call search parameters (nothing on the index is mutated, so concurrent searches are safe)."""
        import faiss

        if self.kind == "hnsw":
            p = faiss.SearchParametersHNSW()
            p.efSearch = max(self.param, k)  # HNSW needs efSearch >= k to return k results
        else:
            p = faiss.SearchParametersIVF()
            p.nprobe = self.param
        return p

    def search(self, queries: np.ndarray, k: int, exclude: list[int | None] | None = None):
        q = np.ascontiguousarray(queries, dtype=np.float32)
        extra = 1 if exclude is not None else 0
        kk = min(k + extra, self.ntotal)
        s, i = self.index.search(q, kk, params=self._params(kk))
        s = np.where(i < 0, -np.inf, s).astype(np.float32)
        return _finish(s, i.astype(np.int64), k, exclude)

    def save(self, path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path, kind: str, param: int) -> "FaissSearch":
        import faiss

        return cls(faiss.read_index(str(path)), kind, param)


def ivf_nlist(n: int) -> int:
    """Number of IVF lists: the power of two nearest to sqrt(n), at least 16."""
    return max(16, 2 ** int(round(math.log2(max(1.0, math.sqrt(n))))))


def sample_queries(features: np.ndarray, n_queries: int, seed: int = 0) -> np.ndarray:
    """Probe queries for recall measurement: normalised mid-points of two random gallery vectors.

    A composed query lies between its reference and what the text asks for, never exactly on a gallery
    item; mid-points of gallery pairs mimic that without needing a model.
    """
    rng = np.random.default_rng(seed)
    n = features.shape[0]
    a = rng.integers(0, n, size=n_queries)
    b = rng.integers(0, n, size=n_queries)
    q = np.asarray(features[a], dtype=np.float32) + np.asarray(features[b], dtype=np.float32)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return q


def neighbour_recall(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k: how many of the exact k nearest neighbours the
    approximate search finds (a fraction; not the retrieval metric R@k of ``offset_cir.eval.metrics``)."""
    k = exact_rows.shape[1]
    hits = [len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) for a, e in zip(approx_rows, exact_rows)]
    return float(np.mean(hits) / k)


def _add_in_blocks(index, features: np.ndarray, block_rows: int = 65536, progress: bool = True) -> None:
    from tqdm.auto import tqdm

    n = features.shape[0]
    for s in tqdm(range(0, n, block_rows), desc="faiss add", unit="block", disable=not progress, leave=False):
        index.add(np.ascontiguousarray(features[s:s + block_rows], dtype=np.float32))


def build_faiss(features: np.ndarray, kind: str, *, k: int = 10, n_queries: int = 200,
                target_recall: float = TARGET_RECALL, hnsw_m: int = 32, ef_construction: int = 40,
                nlist: int | None = None, train_size: int | None = None, seed: int = 0,
                progress: bool = True, exact: ExactSearch | None = None) -> tuple[FaissSearch, FaissReport]:
    """Build a FAISS index over ``features`` and tune its search parameter against exact search.

    The parameter grows (doubling) until recall@k on ``n_queries`` probe queries reaches ``target_recall`` or the
    grid ends; every value tried is measured (recall and ms/query) and returned in the report.
    """
    import faiss

    n, d = features.shape
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    if kind == "hnsw":
        factory = f"HNSW{hnsw_m},SQfp16"
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        faiss.downcast_index(index).hnsw.efConstruction = ef_construction
        param_name, grid = "efSearch", [16, 32, 64, 128, 256, 512]
        train_rows = np.sort(rng.choice(n, size=min(n, 10_000), replace=False))
    elif kind == "ivf":
        nl = int(nlist or ivf_nlist(n))
        factory = f"IVF{nl},SQfp16"
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        param_name = "nprobe"
        grid = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if p <= max(1, nl // 4)]
        m = int(min(n, train_size or max(39 * nl, 20_000)))
        train_rows = np.sort(rng.choice(n, size=m, replace=False))
    else:
        raise ValueError(f"kind must be 'hnsw' or 'ivf', got {kind!r}")
    if train_rows is not None:
        log.info("training %s on %d of %d vectors", factory, len(train_rows), n)
        index.train(np.ascontiguousarray(features[train_rows], dtype=np.float32))
    _add_in_blocks(index, features, progress=progress)
    build_s = time.perf_counter() - t0

    queries = sample_queries(features, n_queries, seed=seed)
    exact = exact or ExactSearch(features)
    _, exact_rows = exact.search(queries, k)
    ann = FaissSearch(index, kind, grid[0])
    rows: list[TuneRow] = []
    chosen = grid[-1]
    for p in grid:
        ann.set_param(p)
        t = time.perf_counter()
        _, approx_rows = ann.search(queries, k)
        ms = (time.perf_counter() - t) * 1000.0 / len(queries)
        rows.append(TuneRow(p, neighbour_recall(approx_rows, exact_rows), ms))
        if rows[-1].recall >= target_recall:
            chosen = p
            break
    ann.set_param(chosen)
    rec = next(r.recall for r in rows if r.param == chosen)
    report = FaissReport(kind, factory, param_name, chosen, rec, k, len(queries), build_s, rows)
    return ann, report
