"""Search speed: query latency (p50, p99) and recall@10 of the approximate index vs exact search, for galleries of
random unit vectors (width 1024, stored float16), and queries per second of the full path (encode query + search)
with the tiny backbone.

    python benchmarks/search_speed.py                       # 10k, 100k, 1M
    python benchmarks/search_speed.py --sizes 10000 100000  # smaller

Random unit vectors in 1024 dimensions are the hardest case for approximate search (no cluster structure: every
vector is nearly orthogonal to every other), so the recall printed here is a floor; ``--clustered`` draws the
gallery around 1000 centres instead, closer to real image embeddings. The engine per size is the one an index of
that size would use when approximate search is forced (HNSW below 1M, IVF from 1M); ``exact`` is the matrix product.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def gallery(n: int, d: int, seed: int, clustered: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float16)
    centres = None
    if clustered:
        centres = rng.standard_normal((1000, d)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        x = rng.standard_normal((m, d)).astype(np.float32)
        if clustered:
            x = centres[rng.integers(0, len(centres), m)] + 0.6 * x / np.sqrt(d)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + m] = x
    return out


def latencies(engine, queries: np.ndarray, k: int) -> np.ndarray:
    t = []
    for q in queries:
        t0 = time.perf_counter()
        engine.search(q[None], k)
        t.append((time.perf_counter() - t0) * 1000.0)
    return np.asarray(t)


def full_path(n_gallery: int, n_queries: int, seed: int) -> dict:
    """Encode query (tiny OFFSET: 64 px image + mask + text) + exact search over ``n_gallery`` vectors, batch 1."""
    import torch
    from PIL import Image

    import offset_cir
    from offset_cir.search import ann
    from offset_cir.search.index import Index

    torch.manual_seed(seed)
    model = offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny")).eval()
    d = int(model.embed_dim)
    feats = gallery(n_gallery, d, seed, False)
    items = [{"id": f"img{i}", "path": f"img{i}.png"} for i in range(n_gallery)]
    man = {"dim": d, "checkpoint": {"hash": "benchmark"}, "uses_masks": True}
    index = Index(None, man, items, feats, ann.ExactSearch(feats), model, device=torch.device("cpu"))
    rng = np.random.default_rng(seed)
    imgs = [Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)) for _ in range(8)]
    mask = Image.fromarray((rng.random((96, 96)) > 0.5).astype(np.uint8) * 255, "L")
    index.search(imgs[0], "warm up", k=10, mask=mask)
    enc, tot = [], []
    for i in range(n_queries):
        t0 = time.perf_counter()
        q = index.encode_query(imgs[i % 8], f"make it colour {i}", mask)
        t1 = time.perf_counter()
        index.search_features(q[None], 10)
        t2 = time.perf_counter()
        enc.append((t1 - t0) * 1000)
        tot.append((t2 - t0) * 1000)
    t0 = time.perf_counter()
    for i in range(n_queries):  # the public call, end to end
        index.search(imgs[i % 8], f"make it colour {i}", k=10, mask=mask)
    qps = n_queries / (time.perf_counter() - t0)
    return {"gallery": n_gallery, "dim": d, "encode_p50": float(np.percentile(enc, 50)),
            "total_p50": float(np.percentile(tot, 50)), "total_p99": float(np.percentile(tot, 99)), "qps": qps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=200, help="probe queries for recall and ANN latency")
    ap.add_argument("--exact-latency-queries", type=int, default=50, help="single queries timed for exact search")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--clustered", action="store_true", help="gallery around 1000 centres instead of uniform")
    ap.add_argument("--threads", type=int, default=None, help="FAISS / BLAS threads (default: all cores)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch threads for the batch-1 query encoder (1: no intra-op overhead for a tiny model)")
    ap.add_argument("--full-path-gallery", type=int, default=10_000)
    ap.add_argument("--full-path-queries", type=int, default=100)
    ap.add_argument("--skip-full-path", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import faiss

    from offset_cir.search import ann

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    print(f"# search_speed: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), width {args.dim}, float16 storage, "
          f"{'clustered' if args.clustered else 'uniform random'} unit vectors, {args.queries} probe queries")
    rows = []
    for n in args.sizes:
        t0 = time.perf_counter()
        feats = gallery(n, args.dim, args.seed, args.clustered)
        gen_s = time.perf_counter() - t0
        exact = ann.ExactSearch(feats)
        queries = ann.sample_queries(feats, args.queries, seed=args.seed + 1)
        lat = latencies(exact, queries[:args.exact_latency_queries], 10)
        rows.append((n, "exact", "-", 0.0, 1.0, np.percentile(lat, 50), np.percentile(lat, 99)))
        kind = ann.choose_kind(n, exact_max=0)
        engine, rep = ann.build_faiss(feats, kind, n_queries=args.queries, target_recall=args.target_recall,
                                      seed=args.seed + 1, progress=False, exact=exact)
        lat = latencies(engine, queries, 10)
        rows.append((n, rep.factory, f"{rep.param_name}={rep.chosen}", rep.build_s, rep.neighbour_recall,
                     np.percentile(lat, 50), np.percentile(lat, 99)))
        print(f"\n## n={n:,} (generated in {gen_s:.1f} s)\n{rep.table()}", flush=True)
        del engine, exact, feats

    print("\n| gallery | engine | search param | build s | recall@10 vs exact | p50 ms | p99 ms |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for n, eng, param, build, rec, p50, p99 in rows:
        print(f"| {n:,} | {eng} | {param} | {build:.1f} | {rec:.3f} | {p50:.2f} | {p99:.2f} |")

    if not args.skip_full_path:
        import torch

        torch.set_num_threads(args.torch_threads)
        r = full_path(args.full_path_gallery, args.full_path_queries, args.seed)
        print(f"\nfull path, tiny backbone (D={r['dim']}), batch 1, {args.torch_threads} torch thread(s), exact search "
              f"over {r['gallery']:,} images:")
        print("| encode p50 ms | encode+search p50 ms | p99 ms | queries/s (Index.search) |")
        print("|---:|---:|---:|---:|")
        print(f"| {r['encode_p50']:.2f} | {r['total_p50']:.2f} | {r['total_p99']:.2f} | {r['qps']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
