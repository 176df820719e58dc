"""CIRCO-scale gallery work: masks over 1 and 2 processes, gallery encode throughput, ranking 800 x 123,403.

Three measurements, each in its own process (so its peak resident memory, ru_maxrss, is its own):

- ``masks``: ``offset masks`` with the tiny random captioner and segmenter (offset_cir.testing.masks) on generated
  images, as one process, then as two processes at once (``--shard 0/2`` and ``--shard 1/2``, the merge
  included): masks per second of wall time, model loading and process start included;
- ``encode``: the evaluation's gallery encoder (``offset_cir.eval.evaluate.Encoder``: DataLoader, decoding,
  preprocessing, ``model.encode_target`` on image and mask) over placeholder images, images per second;
- ``rank``: the evaluation's ranking (``rank_unit``: one matrix product per block of 32 queries, ranks of the
  target and top-50 lists over the whole gallery, the reference kept) for ``--queries`` random query features
  against ``--gallery`` random gallery features of width ``--width`` (ViT-H-14 / ViT-L-14 joint widths: 1024 /
  768), seconds and peak memory (the features themselves included: gallery x width x 4 bytes).

    python benchmarks/gallery_scale.py                 # the CIRCO sizes (the integrator's run, idle machine)
    python benchmarks/gallery_scale.py --tiny          # small sizes: checks that it works
    python benchmarks/gallery_scale.py --device cuda --backbone ViT-L-14 --encode-images 2048

Numbers measured here feed docs/circo.md's projection for a GPU node.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------ parts
def part_masks(args) -> dict:
    import numpy as np
    from PIL import Image

    from offset_cir.testing.masks import build_tiny_blip, build_tiny_clipseg

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        blip, clipseg = build_tiny_blip(tmp / "blip"), build_tiny_clipseg(tmp / "clipseg")
        rng = np.random.default_rng(0)
        (tmp / "img").mkdir()
        w, h = args.mask_size
        for i in range(args.mask_images):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp / "img" / f"{i:05d}.jpg")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
        out = {}
        for procs in (1, 2):
            dest = tmp / f"out{procs}"
            cmd = [sys.executable, "-m", "offset_cir.cli", "masks", "--images", str(tmp / "img"), "--out", str(dest),
                   "--captioner", str(blip), "--segmenter", str(clipseg), "--batch-size", str(args.mask_batch),
                   "--no-progress", "--workers", "2"]
            t0 = time.perf_counter()
            runs = [subprocess.Popen(cmd + ([f"--shard={i}/{procs}"] if procs > 1 else []), env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    for i in range(procs)]
            errors = [r.communicate()[1] for r in runs]
            seconds = time.perf_counter() - t0
            if any(r.returncode for r in runs):
                raise RuntimeError("offset masks failed:\n" + "\n".join(e[-2000:] for e in errors))
            written = len(list(dest.rglob("*-segmask.png")))
            assert written == args.mask_images, (written, args.mask_images)
            out[procs] = {"seconds": seconds, "masks_per_s": written / seconds}
        same = all((tmp / "out1" / p.relative_to(tmp / "out2")).read_bytes() == p.read_bytes()
                   for p in (tmp / "out2").rglob("*-segmask.png"))
    return {"runs": out, "identical": same}


def part_encode(args) -> dict:
    import torch

    from offset_cir import ModelConfig, build_model
    from offset_cir.data import get_dataset
    from offset_cir.eval.evaluate import Encoder
    from offset_cir.testing.placeholders import write_placeholder

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "CIRCO"
        (root / "annotations").mkdir(parents=True)
        (root / "annotations" / "val.json").write_text("[]")
        bench = get_dataset("circo", root)
        ids = [str(100000 + i) for i in range(args.encode_images)]
        for i, image_id in enumerate(ids):
            write_placeholder(bench.image_path(image_id), i + 1)
            write_placeholder(bench.mask_path(image_id), i + 1)
        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone=args.backbone), load_weights=False).to(args.device).eval()
        enc = Encoder(model, bench, args.batch_size, args.num_workers, args.device, progress=False)
        (unit,) = bench.eval_sets("val")
        with torch.no_grad():
            enc.gallery(unit, ids[: args.batch_size])  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            feats = enc.gallery(unit, ids)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
    return {"images": len(ids), "seconds": seconds, "images_per_s": len(ids) / seconds, "width": feats.shape[1],
            "backbone": args.backbone, "masks": bool(model.uses_masks), "peak_rss_mb": _peak_mb()}


class _RandomFeatures:
    """Stands in for the evaluation's encoder: random unit features for the gallery and the queries."""

    def __init__(self, n_gallery: int, n_queries: int, width: int, device: str, batch: int = 32):
        import torch

        g = torch.Generator().manual_seed(0)
        self.gallery_feats = torch.nn.functional.normalize(torch.randn(n_gallery, width, generator=g), dim=-1)
        self.query_feats = torch.nn.functional.normalize(torch.randn(n_queries, width, generator=g), dim=-1)
        self.gallery_feats, self.query_feats = self.gallery_feats.to(device), self.query_feats.to(device)
        self.batch = batch

    def gallery(self, es, ids):
        return self.gallery_feats

    def queries(self, es):
        import torch

        for s in range(0, self.query_feats.shape[0], self.batch):
            idx = torch.arange(s, min(s + self.batch, self.query_feats.shape[0]))
            yield idx, self.query_feats[idx.to(self.query_feats.device)]


def part_rank(args) -> dict:
    import torch

    from offset_cir.data.common import EvalSet, Query
    from offset_cir.eval.evaluate import rank_unit

    torch.set_num_threads(args.threads)
    ids = [str(i) for i in range(args.gallery)]
    queries = [Query(index=i, reference=ids[(7 * i) % len(ids)], text="", target=ids[(13 * i + 1) % len(ids)])
               for i in range(args.queries)]
    es = EvalSet("all", queries, {"all": ids})
    before = _peak_mb()
    enc = _RandomFeatures(args.gallery, args.queries, args.width, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ranked = rank_unit(enc, es, ("all",), top_k=50, need_top=True, exclude_reference=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert len(ranked.top["all"]) == args.queries and all(len(t) == 50 for t in ranked.top["all"])
    out = {"seconds": seconds, "peak_rss_mb": _peak_mb(), "rss_before_features_mb": before,
           "features_mb": args.gallery * args.width * 4 / 2**20}
    if args.device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


PARTS = {"masks": part_masks, "encode": part_encode, "rank": part_rank}


# ------------------------------------------------------------------------------------------------ driver
def _run_part(name: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--only", name, *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if done.returncode:
        raise RuntimeError(f"part {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(args, res: dict) -> None:
    print(f"gallery scale ({'tiny sizes' if args.tiny else 'CIRCO sizes'}), device {args.device}, "
          f"torch threads {args.threads} per process")
    print(f"{'part':<22} | {'setting':<44} | result")
    print("-" * 100)
    m = res["masks"]
    for procs, r in m["runs"].items():
        setting = f"{args.mask_images} images {args.mask_size[0]}x{args.mask_size[1]}, batch {args.mask_batch}"
        label = f"masks, {procs} process" + ("es" if int(procs) > 1 else "")
        print(f"{label:<22} | {setting:<44} | "
              f"{r['masks_per_s']:.2f} masks/s ({r['seconds']:.1f} s wall)")
    print(f"{'masks, 2 vs 1':<22} | {'byte-identical masks':<44} | {m['identical']}")
    e = res["encode"]
    setting = f"{e['backbone']} (D={e['width']}), masks {e['masks']}, batch {args.batch_size}"
    print(f"{'gallery encode':<22} | {setting:<44} | "
          f"{e['images_per_s']:.1f} images/s ({e['images']} images, peak RSS {e['peak_rss_mb']:.0f} MB)")
    r = res["rank"]
    cuda = f", CUDA peak {r['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in r else ""
    setting = f"{args.queries} queries x {args.gallery:,} gallery x D={args.width}"
    print(f"{'rank (top 50)':<22} | {setting:<44} | {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
          f"(features {r['features_mb']:.0f} MB){cuda}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small sizes, to check the script works")
    ap.add_argument("--only", choices=sorted(PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--mask-images", type=int, default=96)
    ap.add_argument("--mask-size", type=int, nargs=2, default=[160, 120], metavar=("W", "H"))
    ap.add_argument("--mask-batch", type=int, default=8)
    ap.add_argument("--encode-images", type=int, default=1024)
    ap.add_argument("--backbone", default="tiny", help="OFFSET backbone for the encode part (random weights)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--gallery", type=int, default=123_403)
    ap.add_argument("--queries", type=int, default=800)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.tiny:
        args.mask_images, args.mask_size, args.mask_batch = 8, [48, 32], 2
        args.encode_images, args.batch_size, args.num_workers = 64, 16, 0
        args.gallery, args.queries = 5_000, 40
    if args.only:
        print(json.dumps(PARTS[args.only](args)))
        return
    _table(args, {name: _run_part(name, sys.argv[1:]) for name in PARTS})


if __name__ == "__main__":
    main()
