"""Service under load: N concurrent searches (default 200) against `offset serve` (a separate process on
127.0.0.1) over an index of the tiny OFFSET, plus a page's worth of thumbnails at the same moment.

    python benchmarks/service_load.py                        # 200 searches, connection caps 512 (default) and 8
    python benchmarks/service_load.py --searches 500 --caps 512 --upload

Prints one row per connection cap: searches answered (200), other statuses, client-side latency p50 / p99 / max
from sending to the full answer, wall time, thumbnails answered, and the server's peak resident memory (VmHWM
from /proc, Linux). Cap 8 is what `offset serve` used before (uvicorn's limit_concurrency = max(8, 4 x 2)).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
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


def make_index(work: Path, n_images: int) -> Path:
    import torch
    from PIL import Image

    import offset_cir
    from offset_cir.search import build_index

    rng = np.random.default_rng(0)
    g = work / "gallery"
    g.mkdir(parents=True)
    for i in range(n_images):
        blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(np.kron(blocks, np.ones((16, 16, 1), dtype=np.uint8))).save(g / f"img{i:04d}.png")
        m = np.zeros((64, 64), dtype=np.uint8)
        y, x = rng.integers(0, 32, size=2)
        m[y:y + 32, x:x + 32] = 255
        Image.fromarray(m, "L").save(g / f"img{i:04d}-segmask.png")
    torch.manual_seed(0)
    ckpt = offset_cir.save_checkpoint(offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny")), work / "ckpt")
    build_index(work / "index", g, checkpoint=ckpt, progress=False, device="cpu", distributed=False)
    return work / "index"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


async def burst(base: str, ids: list[str], n: int, upload: tuple[bytes, bytes] | None, thumbs: int):
    import httpx

    limits = httpx.Limits(max_connections=n + thumbs + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, trust_env=False, limits=limits, timeout=120) as c:
        async def one_search(i):
            t0 = time.perf_counter()
            try:
                if upload is None:
                    r = await c.post("/search", data={"text": f"make it red {i}", "k": "10",
                                                      "ref_id": ids[i % len(ids)]})
                else:
                    r = await c.post("/search", data={"text": f"make it red {i}", "k": "10"},
                                     files={"image": ("q.png", upload[0], "image/png"),
                                            "mask": ("m.png", upload[1], "image/png")})
                status = r.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            return status, time.perf_counter() - t0

        async def one_thumb(i):
            try:
                return (await c.get(f"/images/{ids[i % len(ids)]}")).status_code
            except httpx.HTTPError as exc:
                return type(exc).__name__

        t0 = time.perf_counter()
        results = await asyncio.gather(*[one_search(i) for i in range(n)], *[one_thumb(i) for i in range(thumbs)])
        return results[:n], results[n:], time.perf_counter() - t0


def run_one(index: Path, cap: int, n: int, upload: bool, thumbs: int, concurrency: int) -> dict:
    import httpx

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "offset_cir.cli", "serve", "--index", str(index), "--port",
                             str(port), "--device", "cpu", "--max-connections", str(cap), "--max-concurrency",
                             str(concurrency)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # at most ~2 min to start
            if proc.poll() is not None:
                raise RuntimeError("offset serve exited early")
            try:
                if httpx.get(base + "/health", trust_env=False, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        ids = [x["id"] for x in httpx.get(base + "/gallery", params={"limit": 200}, trust_env=False).json()["images"]]
        payload = None
        if upload:
            g = index.parent / "gallery"
            payload = ((g / f"{ids[0]}.png").read_bytes(), (g / f"{ids[0]}-segmask.png").read_bytes())
        rss_idle = peak_rss_mib(proc.pid)
        searches, thumb_status, wall = asyncio.run(burst(base, ids, n, payload, thumbs))
        rss_peak = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    ok = [t for s, t in searches if s == 200]
    others = collections.Counter(str(s) for s, _ in searches if s != 200)
    lat = np.asarray(ok) * 1000.0 if ok else np.asarray([np.nan])
    return {"cap": cap, "answered": len(ok), "n": n, "others": dict(others), "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "max": float(np.max(lat)), "wall": wall,
            "thumbs_ok": sum(1 for s in thumb_status if s == 200), "thumbs": thumbs, "rss_idle": rss_idle,
            "rss_peak": rss_peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--searches", type=int, default=200, help="concurrent searches (default 200)")
    ap.add_argument("--thumbnails", type=int, default=30, help="thumbnail requests sent at the same time (default 30)")
    ap.add_argument("--images", type=int, default=200, help="gallery size (default 200)")
    ap.add_argument("--caps", type=int, nargs="+", default=[512, 8],
                    help="--max-connections values to try (default 512, the default now, and 8, the old limit)")
    ap.add_argument("--max-concurrency", type=int, default=2, help="offset serve --max-concurrency (default 2)")
    ap.add_argument("--upload", action="store_true", help="upload image + mask instead of gallery references")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="offset-load-"))
    try:
        index = make_index(work, args.images)
        rows = [run_one(index, cap, args.searches, args.upload, args.thumbnails, args.max_concurrency)
                for cap in args.caps]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kind = "upload" if args.upload else "gallery ref_id"
    print(f"# {args.searches} concurrent searches ({kind}, k=10) + {args.thumbnails} thumbnails, tiny OFFSET, "
          f"{args.images} images, --max-concurrency {args.max_concurrency}, server OMP_NUM_THREADS=1; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print("| --max-connections | searches answered | other answers | p50 ms | p99 ms | max ms | wall s | "
          "thumbnails answered | server peak RSS MiB (idle) |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        others = ", ".join(f"{k}: {v}" for k, v in sorted(r["others"].items())) or "-"
        print(f"| {r['cap']} | {r['answered']}/{r['n']} | {others} | {r['p50']:.0f} | {r['p99']:.0f} | "
              f"{r['max']:.0f} | {r['wall']:.1f} | {r['thumbs_ok']}/{r['thumbs']} | "
              f"{r['rss_peak']:.0f} ({r['rss_idle']:.0f}) |")


if __name__ == "__main__":
    main()
