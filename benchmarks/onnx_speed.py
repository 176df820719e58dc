"""Query-encode latency per runtime on this CPU, and what int8 costs in retrieval.

    python benchmarks/onnx_speed.py [--backbones tiny ViT-B-16] [--repeats 20] [--threads 2] [--no-overlap]

Latency: one composed query (batch 1: image + mask + tokens -> q) encoded by torch fp32, torch bf16 autocast,
onnxruntime fp32 and onnxruntime int8 (dynamic quantisation), random-init models. The runtimes are measured
interleaved (one call of each in turn, ``--repeats`` rounds) so a loaded, shared machine slows them alike and their
ratios stay fair; p50 and p99 over the rounds (with 20 rounds p99 is close to the slowest call). Each thread count
(torch threads = onnxruntime intra-op threads) is its own block: on a machine whose cores other processes also
use, 2 threads can measure contention more than compute (torch's OpenMP pool suffers most).

Retrieval cost of int8: a tiny OFFSET briefly trained on the synthetic benchmark, exported with --int8; every
test query ranks the test gallery with fp32 and with int8 (query and gallery both encoded by the same graphs);
the table gives the mean overlap of the two top-10 lists and Recall@1/5/10 against the true targets (with the
chance level: a tiny model trained for a few dozen steps is still near it, so its scores are close together and
int8 reorders them more easily than it would a trained model's: a pessimistic estimate).

Prints two tables; every ratio in them comes from this one run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import offset_cir
from offset_cir.export.onnx import export_onnx
from offset_cir.export.runtime import OnnxEncoder


def latency(backbone: str, repeats: int, thread_counts: list[int], workdir: Path) -> list[dict]:
    torch.manual_seed(0)
    model = offset_cir.build_model(offset_cir.ModelConfig(backbone=backbone)).eval()
    t0 = time.perf_counter()
    export_onnx(model, workdir / backbone, int8=True)
    export_s = time.perf_counter() - t0
    rows = []
    for threads in thread_counts:
        rows += _latency_rows(model, backbone, repeats, threads, workdir, export_s)
    return rows


def _latency_rows(model, backbone: str, repeats: int, threads: int, workdir: Path, export_s: float) -> list[dict]:
    torch.set_num_threads(threads)
    s = model.preprocess.image_size
    g = torch.Generator().manual_seed(1)
    images, masks = torch.randn(1, 3, s, s, generator=g), torch.randn(1, 3, s, s, generator=g)
    tokens = model.tokenize(["replace the red circle by a blue striped star, keep the size"])
    fp32 = OnnxEncoder(workdir / backbone, threads=threads)
    int8 = OnnxEncoder(workdir / backbone, threads=threads, int8=True)

    def run_torch(autocast):
        def call():
            with torch.inference_mode(), autocast():
                model.encode_query(images, masks, tokens)
        return call

    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    runs = {
        "torch fp32": run_torch(contextlib.nullcontext),
        "torch bf16 autocast": run_torch(bf16),
        "onnxruntime fp32": lambda: fp32.encode_query(images, masks, tokens),
        "onnxruntime int8": lambda: int8.encode_query(images, masks, tokens),
    }
    for fn in runs.values():  # warm-up (session creation, first-call allocations)
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1000)
        print(f"  [{backbone}, {threads} threads] round {i + 1}/{repeats}: "
              + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items()), file=sys.stderr, flush=True)
    base = float(np.median(times["torch fp32"]))
    rows = []
    for name, ts in times.items():
        p50 = float(np.median(ts))
        rows.append({"backbone": backbone, "threads": threads, "runtime": name, "p50": p50, "p99": float(np.percentile(ts, 99)),
                     "speedup": base / p50, "export_s": export_s})
    return rows


def int8_overlap(workdir: Path, n_test: int, steps: int, threads: int) -> dict:
    from PIL import Image

    from offset_cir.testing.search import synthetic_image_pair as _load, train_tiny_on_synthetic

    root, checkpoint, _ = train_tiny_on_synthetic(workdir, steps, n_train=8 * steps, n_test=n_test, new_lr=1e-3)
    model = offset_cir.load_checkpoint(checkpoint).eval()
    export_onnx(model, workdir / "trained", int8=True)
    encoders = {"fp32": OnnxEncoder(workdir / "trained", threads=threads),
                "int8": OnnxEncoder(workdir / "trained", threads=threads, int8=True)}
    pre = model.preprocess
    names = sorted(p.stem for p in (root / "test").glob("*.png") if not p.stem.endswith("-segmask"))
    gal_img = torch.stack([pre.image(Image.open(root / "test" / f"{n}.png")) for n in names])
    gal_msk = torch.stack([pre.mask(Image.open(root / "test" / f"{n}-segmask.png")) for n in names])
    test = json.loads((root / "captions" / "cap.rc2.test.json").read_text())
    q_img, q_msk = zip(*[_load(root, "test", r["reference"], pre, False) for r in test])
    q_img, q_msk, texts = torch.stack(q_img), torch.stack(q_msk), [r["caption"] for r in test]
    ref_rows = np.array([names.index(r["reference"]) for r in test])
    tgt_rows = np.array([names.index(r["target_hard"]) for r in test])
    top, ranks = {}, {}
    for key, enc in encoders.items():
        gal = torch.cat([enc.encode_target(gal_img[i:i + 64], gal_msk[i:i + 64]) for i in range(0, len(names), 64)])
        q = torch.cat([enc.encode_query(q_img[i:i + 64], q_msk[i:i + 64], texts[i:i + 64])
                       for i in range(0, len(texts), 64)])
        scores = (q @ gal.T).numpy()
        scores[np.arange(len(test)), ref_rows] = -np.inf  # the reference is not a result (CIRR protocol)
        order = np.argsort(-scores, axis=1, kind="stable")
        top[key] = order[:, :10]
        ranks[key] = np.argmax(order == tgt_rows[:, None], axis=1)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top["fp32"], top["int8"])])
    same_first = float(np.mean(top["fp32"][:, 0] == top["int8"][:, 0]))
    recall = {key: {k: float(np.mean(r < k)) for k in (1, 5, 10)} for key, r in ranks.items()}
    return {"queries": len(test), "gallery": len(names), "steps": steps, "overlap@10": float(overlap),
            "same_top1": same_first, "recall": recall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["tiny", "ViT-B-16"])
    ap.add_argument("--repeats", type=int, default=20, help="interleaved rounds per backbone")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="torch threads = onnxruntime intra-op threads; one table block per value")
    ap.add_argument("--no-overlap", action="store_true", help="skip the int8 retrieval table")
    ap.add_argument("--no-latency", action="store_true", help="skip the latency table")
    ap.add_argument("--test-queries", type=int, default=100, help="synthetic test queries for the int8 table")
    ap.add_argument("--train-steps", type=int, default=30, help="training steps of the tiny model (batch 8)")
    args = ap.parse_args()
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, threads {args.threads}, batch 1, "
          f"{args.repeats} interleaved rounds")
    with tempfile.TemporaryDirectory(prefix="onnx-speed-") as tmp:
        work = Path(tmp)
        if not args.no_latency:
            head = f"{'backbone':<10}{'threads':>8}  {'runtime':<22}{'p50 ms':>10}{'p99 ms':>10}{'vs torch fp32':>15}"
            print(head)
            print("-" * len(head))
            for backbone in args.backbones:
                rows = latency(backbone, args.repeats, args.threads, work)
                for r in rows:
                    print(f"{r['backbone']:<10}{r['threads']:>8}  {r['runtime']:<22}{r['p50']:>10.2f}{r['p99']:>10.2f}"
                          f"{r['speedup']:>14.2f}x")
                print(f"{'':<10}(export with --int8: {rows[0]['export_s']:.1f} s)")
        if not args.no_overlap:
            torch.set_num_threads(min(args.threads))
            o = int8_overlap(work, args.test_queries, args.train_steps, min(args.threads))
            print()
            print(f"int8 vs fp32 on the synthetic test split: {o['queries']} queries, gallery {o['gallery']} images, "
                  f"tiny trained {o['steps']} steps")
            head = f"{'graphs':<8}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'top-10 overlap with fp32':>27}{'same top-1':>12}"
            print(head)
            print("-" * len(head))
            chance = {k: k / (o["gallery"] - 1) for k in (1, 5, 10)}
            print(f"{'chance':<8}{chance[1]:>8.3f}{chance[5]:>8.3f}{chance[10]:>8.3f}")
            for key in ("fp32", "int8"):
                r = o["recall"][key]
                ov, t1 = (1.0, 1.0) if key == "fp32" else (o["overlap@10"], o["same_top1"])
                print(f"{key:<8}{r[1]:>8.3f}{r[5]:>8.3f}{r[10]:>8.3f}{ov:>27.3f}{t1:>12.3f}")


if __name__ == "__main__":
    main()
