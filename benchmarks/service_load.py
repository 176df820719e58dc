"""Search service speed: single-query latency and concurrent throughput of `offset serve` (a separate process on
127.0.0.1), for the demo checkpoint and a ViT-B-16 index, in the encoder's modes -- fp32 one query at a time
(--max-batch 1, 2 searches at once), bf16, batched, and the defaults (auto precision, batches of 8) -- with the
cosine of bf16 query features against fp32's, what auto chose, and for the demo checkpoint the top-10 overlap of
auto's (and bf16's) rankings with fp32's on the synthetic test split.

    python benchmarks/service_load.py                  # 200 images, 30 sequential queries, 64 concurrent
    python benchmarks/service_load.py --tiny           # a quick check that everything runs (timings meaningless)
    python benchmarks/service_load.py --models vit --concurrent 64 --sequential 30

The demo checkpoint is --demo-checkpoint (default runs/demo/seed0/offset/best, made by `offset demo`) with its
benchmark --demo-data (default data/synthetic-demo); when the checkpoint is absent a stand-in is trained -- the demo's
recipe for a few steps on a small synthetic benchmark -- and the table says so. ViT-B-16 is randomly initialised.
Queries name gallery images (ref_id), each with its own text. The server keeps the environment's thread settings
(OMP_NUM_THREADS, printed in the header).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: (label, `offset serve` flags) of the modes measured; the first is the baseline of the speed-up column
MODES = [
    ("fp32, one at a time", ["--precision", "fp32", "--max-batch", "1", "--max-concurrency", "2"]),
    ("bf16, one at a time", ["--precision", "bf16", "--max-batch", "1", "--max-concurrency", "2"]),
    ("fp32, batched", ["--precision", "fp32", "--max-batch", "8", "--max-concurrency", "8"]),
    ("bf16, batched", ["--precision", "bf16", "--max-batch", "8", "--max-concurrency", "8"]),
    ("defaults (auto, batched)", []),
]
DEMO_CHECKPOINT = "runs/demo/seed0/offset/best"
DEMO_DATA = "data/synthetic-demo"


# ----------------------------------------------------------------------------------------------- the models


def demo_model(args, work: Path) -> tuple[Path, Path, str]:
    """(checkpoint, synthetic benchmark root, what it is): the demo's checkpoint, or a stand-in trained now."""
    ckpt, data = Path(args.demo_checkpoint), Path(args.demo_data)
    if ckpt.exists():
        if not (data / "test").is_dir():
            from offset_cir.data.synthetic import generate

            data = work / "synthetic"
            generate(data, seed=0, image_size=64, n_train=8, n_val=4, n_test=args.test_queries, progress=False)
        return ckpt, data, f"demo checkpoint {ckpt}"
    from offset_cir.demo import run_demo

    print(f"# {ckpt} not found: training a stand-in (the demo's recipe, {args.standin_steps} steps, "
          f"{args.test_queries} test queries)", file=sys.stderr, flush=True)
    steps = args.standin_steps
    run_demo(work / "demo", work / "synthetic", preset="demo",
             overrides=[f"max_steps={steps}", f"eval_every_steps={steps}"],
             synth_kwargs={"n_train": 64, "n_val": 8, "n_test": args.test_queries}, build_search_index=False,
             progress=False)
    return (work / "demo" / "seed0" / "offset" / "best", work / "synthetic",
            f"stand-in for the demo checkpoint (demo recipe, {args.standin_steps} steps; no {ckpt})")


def vit_model(work: Path) -> Path:
    import torch

    import offset_cir

    torch.manual_seed(0)
    model = offset_cir.build_model(offset_cir.ModelConfig(backbone="ViT-B-16"))
    return offset_cir.save_checkpoint(model, work / "vit-b-16")


def make_index(ckpt: Path, data: Path, out: Path, n_images: int) -> Path:
    """An fp32 index of the first ``n_images`` images (with their masks) of the benchmark's test folder."""
    from offset_cir.search import build_index

    gallery = out.parent / (out.name + "-gallery")
    gallery.mkdir(parents=True)
    images = sorted(p for p in (data / "test").rglob("*.png") if "-seg" not in p.stem)[:n_images]
    for p in images:
        shutil.copy2(p, gallery / p.name)
        for mask in p.parent.glob(p.stem + "-seg*"):
            shutil.copy2(mask, gallery / mask.name)
    build_index(out, gallery, checkpoint=ckpt, progress=False, device="cpu", distributed=False)
    return out


# ----------------------------------------------------------------------------------------------- agreement


def query_cosines(index_dir: Path, n: int) -> tuple[float, float]:
    """(min, mean) cosine of bf16 query features with fp32's, over ``n`` gallery references with their own texts."""
    from offset_cir.search import Index

    fp32 = Index.open(index_dir, device="cpu", precision="fp32")
    bf16 = Index.open(index_dir, device="cpu", precision="bf16")
    ids = fp32.ids[:n]
    a = np.stack([fp32.query_for_id(i, f"make it red and striped {k}") for k, i in enumerate(ids)])
    b = np.stack([bf16.query_for_id(i, f"make it red and striped {k}") for k, i in enumerate(ids)])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.min()), float(cos.mean())


def top10_overlaps(ckpt: Path, data: Path, work: Path) -> dict:
    """Per precision (fp32, auto, bf16): R@10 and the mean top-10 overlap with fp32's rankings on the test split."""
    import offset_cir
    from offset_cir.data import get_dataset
    from offset_cir.eval.evaluate import evaluate
    from offset_cir.export.precision import use_precision

    bench = get_dataset("synthetic", data)
    tops, out = {}, {}
    for precision in ("fp32", "auto", "bf16"):
        model, choice = use_precision(offset_cir.load_checkpoint(ckpt).eval(), precision)
        path = work / f"rankings-{precision}.jsonl"
        result = evaluate(model, bench, split="test", save_rankings=path, device="cpu", progress=False)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        tops[precision] = {(r["unit"], r["gallery"], r["index"]): r["top"][:10] for r in rows}
        out[precision] = {"runs": choice.precision, "R@10": result["metrics"].get("R@10")}
    for precision, top in tops.items():
        out[precision]["overlap"] = float(np.mean([len(set(top[k]) & set(tops["fp32"][k])) / 10 for k in top]))
    return out


# ----------------------------------------------------------------------------------------------- the service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index_dir: Path, flags: list[str]):
    import httpx

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "offset_cir.cli", "serve", "--index", str(index_dir), "--port",
                             str(port), "--device", "cpu", *flags], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # loading ViT-B-16 and calibrating take a while on a small machine
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"offset serve {' '.join(flags)} exited early")
        try:
            return proc, base, httpx.get(base + "/health", trust_env=False, timeout=5).json()
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("offset serve did not start within 15 minutes")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


async def searches(base: str, ids: list[str], n: int, at_once: bool, offset: int = 0) -> tuple[list[float], float]:
    """``n`` searches (each its own text), all at once or one after another: (seconds of each answered one, wall)."""
    import httpx

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=0 if at_once else 4)
    async with httpx.AsyncClient(base_url=base, trust_env=False, limits=limits, timeout=3600) as c:
        async def one(i):
            t0 = time.perf_counter()
            r = await c.post("/search", data={"text": f"make it red {offset + i}", "k": "10",
                                              "ref_id": ids[i % len(ids)]})
            return time.perf_counter() - t0 if r.status_code == 200 else None

        t0 = time.perf_counter()
        if at_once:
            took = await asyncio.gather(*[one(i) for i in range(n)])
        else:
            took = [await one(i) for i in range(n)]
        return [t for t in took if t is not None], time.perf_counter() - t0


def measure_mode(index_dir: Path, flags: list[str], sequential: int, concurrent: int) -> dict:
    proc, base, health = start_server(index_dir, flags)
    try:
        import httpx

        ids = [x["id"] for x in httpx.get(base + "/gallery", params={"limit": 200}, trust_env=False).json()["images"]]
        asyncio.run(searches(base, ids, 2, at_once=False, offset=10_000))  # warm-up
        single, _ = asyncio.run(searches(base, ids, sequential, at_once=False))
        burst, wall = asyncio.run(searches(base, ids, concurrent, at_once=True, offset=1000))
    finally:
        stop_server(proc)
    lat = np.asarray(single) * 1000.0 if single else np.asarray([np.nan])
    return {"precision": health["precision"], "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "answered": len(burst), "concurrent": concurrent,
            "qps": len(burst) / wall if wall > 0 else float("nan")}


# ----------------------------------------------------------------------------------------------- the report


def print_report(args, rows: list[dict], notes: list[str]) -> None:
    threads = os.environ.get("OMP_NUM_THREADS", "torch's default")
    print(f"# offset serve, {args.images} gallery images, {args.sequential} sequential queries, {args.concurrent} "
          f"concurrent; server threads: OMP_NUM_THREADS={threads}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print(f"| model | mode | runs in | single p50 ms | single p99 ms | {args.concurrent}-concurrent queries/s | "
          f"x fp32 one at a time |")
    print("|---|---|---|---:|---:|---:|---:|")
    base = {}
    for r in rows:
        base.setdefault(r["model"], r["qps"])
        done = "" if r["answered"] == r["concurrent"] else f" ({r['answered']}/{r['concurrent']} answered)"
        print(f"| {r['model']} | {r['mode']} | {r['precision']['precision']} | {r['p50']:.0f} | {r['p99']:.0f} | "
              f"{r['qps']:.2f}{done} | {r['qps'] / base[r['model']]:.2f} |")
    print()
    for line in notes:
        print(line)


def run_model(name: str, ckpt: Path, data: Path, work: Path, args) -> tuple[list[dict], list[str]]:
    index_dir = make_index(ckpt, data, work / f"{name}-index", args.images)
    rows, notes = [], []
    for label, flags in MODES:
        r = measure_mode(index_dir, flags, args.sequential, args.concurrent)
        rows.append({"model": name, "mode": label, **r})
        if not flags:
            notes.append(f"- {name}: auto chose {r['precision']['precision']} ({r['precision']['reason']}; "
                         f"calibration cosine {r['precision']['cosine']:.6f})")
    low, mean = query_cosines(index_dir, args.sequential)
    notes.append(f"- {name}: cosine of bf16 with fp32 query features over {args.sequential} queries: min {low:.6f}, "
                 f"mean {mean:.6f}")
    return rows, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=["demo", "vit"], default=["demo", "vit"])
    ap.add_argument("--images", type=int, default=200, help="gallery images (default 200)")
    ap.add_argument("--sequential", type=int, default=30, help="queries one after another (default 30)")
    ap.add_argument("--concurrent", type=int, default=64, help="queries sent at once (default 64)")
    ap.add_argument("--test-queries", type=int, default=500, help="synthetic test split when it is generated here")
    ap.add_argument("--demo-checkpoint", default=DEMO_CHECKPOINT)
    ap.add_argument("--demo-data", default=DEMO_DATA)
    ap.add_argument("--standin-steps", type=int, default=300, help="steps of the stand-in demo model (default 300)")
    ap.add_argument("--tiny", action="store_true", help="8 images, 3 + 4 queries, a 4-step stand-in: a quick check")
    args = ap.parse_args()
    if args.tiny:
        args.images, args.sequential, args.concurrent, args.test_queries, args.standin_steps = 8, 3, 4, 24, 4
    work = Path(tempfile.mkdtemp(prefix="offset-service-load-"))
    rows, notes = [], []
    try:
        if "demo" in args.models:
            ckpt, data, what = demo_model(args, work)
            notes.append(f"- demo: {what}")
            r, n = run_model("demo", ckpt, data, work, args)
            rows += r
            notes += n
            overlap = top10_overlaps(ckpt, data, work)
            notes.append("- demo, synthetic test split: top-10 overlap with fp32 -- " + "; ".join(
                f"{p} (runs {o['runs']}): {o['overlap']:.3f}, R@10 {o['R@10']:.2f}" for p, o in overlap.items()))
        if "vit" in args.models:
            data = Path(args.demo_data) if (Path(args.demo_data) / "test").is_dir() else work / "synthetic"
            if not (data / "test").is_dir():
                from offset_cir.data.synthetic import generate

                generate(data, seed=0, image_size=64, n_train=8, n_val=4, n_test=max(args.images, 24), progress=False)
            r, n = run_model("ViT-B-16", vit_model(work), data, work, args)
            rows += r
            notes += n
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_report(args, rows, notes)


if __name__ == "__main__":
    main()
