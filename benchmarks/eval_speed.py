"""Evaluation speed and peak memory on a CIRR-val-sized protocol (4,181 queries, 2,297 gallery images).

Uses the real CIRR val annotations (../shared/data/cirr) with 8x8 placeholder images written to a temporary
folder. Each variant runs in its own process so that its peak resident memory (ru_maxrss) is its own:

- ``evaluate/<encoder>/bs<B>``: ``offset_cir.evaluate`` end to end (DataLoader, encoding, one matrix product
  per query batch, ranks, R@K and R_subset@K);
- ``naive-metrics`` vs ``vector-metrics``: the metric stage alone on the same precomputed features: a
  per-query Python loop (sort every candidate list in Python, drop the reference, find the target) against
  the batched path of :mod:`offset_cir.eval.metrics`; both must give the same numbers.

Encoders: ``tiny`` (the package's tiny OFFSET backbone, random init) when it builds, and ``hash`` (a fixed
random 512-d feature per image: no network cost, isolates loading and ranking).

    python benchmarks/eval_speed.py [--encoders tiny hash] [--batch-sizes 32 256]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "cirr"


def _prepare(folder: Path) -> None:
    from offset_cir.data import get_dataset
    from offset_cir.testing.placeholders import write_benchmark_placeholders

    for sub in ("captions", "image_splits"):
        shutil.copytree(SHARED / sub, folder / "cirr" / sub)
    bench = get_dataset("cirr", folder)
    codes = write_benchmark_placeholders(bench, "val")
    (folder / "codes.json").write_text(json.dumps(codes))


def _model(encoder: str):
    import torch

    if encoder == "tiny":
        import offset_cir

        torch.manual_seed(0)
        return offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny"))
    from offset_cir.testing.oracle import HashModel

    return HashModel(dim=512, max_code=4096)


def _run_evaluate(folder: Path, encoder: str, batch_size: int) -> dict:
    from offset_cir.data import get_dataset
    from offset_cir.eval.evaluate import evaluate

    bench = get_dataset("cirr", folder)
    model = _model(encoder)
    t = time.perf_counter()
    res = evaluate(model, bench, "cirr-val", batch_size=batch_size, num_workers=0, progress=False)
    return {"seconds": time.perf_counter() - t, "R@5": res["metrics"]["R@5"],
            "R_subset@1": res["metrics"]["R_subset@1"]}


def _features(folder: Path):
    """Precomputed hash features for the metric-stage comparison (no image I/O)."""
    import torch

    from offset_cir.data import get_dataset
    from offset_cir.testing.oracle import HashModel

    bench = get_dataset("cirr", folder)
    codes = json.loads((folder / "codes.json").read_text())
    (es,) = bench.eval_sets("val")
    model = HashModel(dim=512, max_code=4096)
    gallery = es.galleries["all"]
    g = model.table[torch.as_tensor([codes[x] for x in gallery])]
    import zlib

    qi = torch.as_tensor([codes[q.reference] for q in es.queries])
    ti = torch.as_tensor([zlib.crc32(q.text.encode()) % model.table.shape[0] for q in es.queries])
    q = torch.nn.functional.normalize(model.table[qi] + model.table[ti], dim=-1)
    return es, gallery, g, q


def _naive_metrics(es, gallery, g, q) -> dict:
    """Per-query Python loop: one score vector per query, a Python sort, list lookups."""
    pos = {x: j for j, x in enumerate(gallery)}
    hits = {k: 0 for k in (1, 5, 10, 50)}
    shits = {k: 0 for k in (1, 2, 3)}
    for i, query in enumerate(es.queries):
        scores = (g @ q[i]).tolist()
        order = sorted(range(len(gallery)), key=lambda j: -scores[j])
        order = [j for j in order if gallery[j] != query.reference]
        rank = order.index(pos[query.target])
        for k in hits:
            hits[k] += rank < k
        members = [m for m in query.members if m != query.reference]
        sub = sorted(members, key=lambda m: -scores[pos[m]])
        srank = sub.index(query.target)
        for k in shits:
            shits[k] += srank < k
    n = len(es.queries)
    out = {f"R@{k}": 100.0 * v / n for k, v in hits.items()}
    out.update({f"R_subset@{k}": 100.0 * v / n for k, v in shits.items()})
    return out


def _vector_metrics(es, gallery, g, q, batch_size: int = 256) -> dict:
    import torch

    from offset_cir.eval import metrics as M

    pos = {x: j for j, x in enumerate(gallery)}
    tgt = torch.as_tensor([pos[x.target] for x in es.queries])
    ref = torch.as_tensor([pos[x.reference] for x in es.queries])
    mem = [[pos[m] for m in x.members if m != x.reference] for x in es.queries]
    mrows = torch.as_tensor(mem)
    mt = torch.as_tensor([m.index(pos[x.target]) for m, x in zip(mem, es.queries)])
    ranks, sranks = [], []
    for s in range(0, len(es.queries), batch_size):
        qb = q[s:s + batch_size]
        ranks.append(M.target_ranks(qb @ g.T, tgt[s:s + batch_size], ref[s:s + batch_size]))
        sub = torch.einsum("bd,bmd->bm", qb, g[mrows[s:s + batch_size]])
        sranks.append(M.target_ranks(sub, mt[s:s + batch_size]))
    ranks, sranks = torch.cat(ranks), torch.cat(sranks)
    out = M.recalls(ranks, (1, 5, 10, 50))
    out.update(M.recalls(sranks, (1, 2, 3), "R_subset"))
    return out


def _child(args) -> None:
    folder = Path(args.folder)
    if args.variant == "evaluate":
        out = _run_evaluate(folder, args.encoder, args.batch_size)
    else:
        es, gallery, g, q = _features(folder)
        fn = _naive_metrics if args.variant == "naive-metrics" else _vector_metrics
        t = time.perf_counter()
        metrics = fn(es, gallery, g, q)
        out = {"seconds": time.perf_counter() - t, "metrics": metrics}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def _spawn(folder: Path, variant: str, encoder: str = "hash", batch_size: int = 32) -> dict:
    cmd = [sys.executable, __file__, "--child", "--folder", str(folder), "--variant", variant,
           "--encoder", encoder, "--batch-size", str(batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{variant}/{encoder} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", nargs="+", default=["tiny", "hash"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 256])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="evaluate", help=argparse.SUPPRESS)
    p.add_argument("--encoder", default="hash", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return 0
    if not SHARED.is_dir():
        print(f"CIRR annotations not found at {SHARED}; nothing to measure")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        _prepare(folder)
        print(f"placeholders: 2,297 images + masks written in {time.perf_counter() - t:.1f} s "
              f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, cpus={os.cpu_count()})")
        rows = []
        for enc in args.encoders:
            for bs in args.batch_sizes:
                try:
                    r = _spawn(folder, "evaluate", enc, bs)
                except RuntimeError as exc:
                    print(f"skipped evaluate/{enc}/bs{bs}: {str(exc).splitlines()[0]}")
                    continue
                rows.append((f"evaluate/{enc}/bs{bs}", r["seconds"], r["peak_rss_mb"],
                             f"R@5 {r['R@5']:.2f} R_subset@1 {r['R_subset@1']:.2f}"))
        naive = _spawn(folder, "naive-metrics")
        vector = _spawn(folder, "vector-metrics")
        same = all(abs(naive["metrics"][k] - vector["metrics"][k]) < 1e-9 for k in naive["metrics"])
        rows.append(("naive-metrics (per-query loop)", naive["seconds"], naive["peak_rss_mb"], ""))
        rows.append(("vector-metrics (batched)", vector["seconds"], vector["peak_rss_mb"],
                     f"same numbers: {same}; speed-up x{naive['seconds'] / max(vector['seconds'], 1e-9):.1f}"))
    print(f"{'variant':<34}{'seconds':>9}{'peak RSS MB':>13}  notes")
    for name, sec, mb, note in rows:
        print(f"{name:<34}{sec:>9.2f}{mb:>13.0f}  {note}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
