"""Model speed on this machine: ms per training step and per encoded query / target, for the `tiny` and
`ViT-B-16` backbones at batch 8, fp32 vs bf16 autocast, image+mask batched into one encoder call vs separate.

    python benchmarks/model_speed.py [--backbones tiny ViT-B-16] [--batch 8] [--repeats 3]

Prints one table; every ratio in it is measured in this one run.
"""
from __future__ import annotations

import argparse
import time

import torch
from _workload import make_workload  # benchmarks/ is on sys.path when a script in it runs


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1000


def measure(backbone: str, batch: int, precision: str, batched: bool, repeats: int) -> dict:
    w = make_workload(backbone, batch, precision, batch_encoder_calls=batched)
    model, ctx = w.model, w.autocast

    def query():
        with torch.no_grad(), ctx():
            model.encode_query(w.images, w.masks, w.texts)

    def target():
        with torch.no_grad(), ctx():
            model.encode_target(w.tgt_images, w.tgt_masks)

    model.train()
    t_step = _time(w.step, repeats)
    model.eval()
    return {"step": t_step, "query": _time(query, repeats) / batch, "target": _time(target, repeats) / batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["tiny", "ViT-B-16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, best of {args.repeats}")
    head = f"{'backbone':<10}{'precision':<10}{'encoder':<10}{'ms/step':>10}{'ms/query':>10}{'ms/target':>11}{'step vs fp32':>14}{'step vs separate':>18}"
    print(head)
    print("-" * len(head))
    for backbone in args.backbones:
        rows = {}
        for precision in ("fp32", "bf16"):
            for batched in (True, False):
                rows[(precision, batched)] = measure(backbone, args.batch, precision, batched, args.repeats)
        for (precision, batched), r in rows.items():
            vs_fp32 = rows[("fp32", batched)]["step"] / r["step"]
            vs_sep = rows[(precision, False)]["step"] / r["step"]
            print(f"{backbone:<10}{precision:<10}{'batched' if batched else 'separate':<10}{r['step']:>10.1f}"
                  f"{r['query']:>10.2f}{r['target']:>11.2f}{vs_fp32:>13.2f}x{vs_sep:>17.2f}x")


if __name__ == "__main__":
    main()
