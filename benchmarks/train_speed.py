"""Training throughput: triplets per second for the `tiny` and `ViT-B-16` backbones, fp32 vs bf16 autocast,
batch 8 and 32, measured on random tensors (the model's cost alone, no image decoding).

    python benchmarks/train_speed.py [--backbones tiny ViT-B-16] [--batches 8 32] [--steps 3]

On a CUDA machine it also reports ViT-H-14 at batch 16 in bf16, with and without gradient checkpointing:
triplets/s, peak memory, and the fraction of the GPU's peak bf16 FLOP rate (--peak-tflops, default 989 for an
H100 SXM) that the measured rate represents (FLOPs counted with torch.utils.flop_counter on one step).
"""
from __future__ import annotations

import argparse
import time

import torch
from _workload import make_workload  # benchmarks/ is on sys.path when a script in it runs


def run(backbone: str, batch: int, precision: str, steps: int, device: str, grad_ckpt: bool = False) -> dict:
    step = make_workload(backbone, batch, precision, device, grad_checkpointing=grad_ckpt).step
    step()
    flops = None
    if device == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            step()
        flops = fc.get_total_flops()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    out = {"triplets_s": batch / dt, "step_s": dt}
    if device == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["flops_per_step"] = flops
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["tiny", "ViT-B-16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, {args.steps} timed steps after a warm-up")
    head = f"{'device':<7}{'backbone':<10}{'batch':>6}{'precision':>10}{'triplets/s':>12}{'s/step':>9}{'bf16 vs fp32':>14}"
    print(head)
    print("-" * len(head))
    for backbone in args.backbones:
        for batch in args.batches:
            res = {p: run(backbone, batch, p, args.steps, "cpu") for p in ("fp32", "bf16")}
            for p, r in res.items():
                ratio = r["triplets_s"] / res["fp32"]["triplets_s"]
                print(f"{'cpu':<7}{backbone:<10}{batch:>6}{p:>10}{r['triplets_s']:>12.2f}{r['step_s']:>9.3f}{ratio:>13.2f}x")
    if torch.cuda.is_available():
        print()
        head = f"{'device':<7}{'backbone':<10}{'batch':>6}{'grad ckpt':>10}{'triplets/s':>12}{'peak GiB':>10}{'TFLOP/s':>9}{'of peak':>9}"
        print(head)
        print("-" * len(head))
        for ckpt in (False, True):
            r = run("ViT-H-14", 16, "bf16", args.steps, "cuda", grad_ckpt=ckpt)
            tflops = r["flops_per_step"] / r["step_s"] / 1e12
            print(f"{'cuda':<7}{'ViT-H-14':<10}{16:>6}{str(ckpt):>10}{r['triplets_s']:>12.2f}{r['peak_gib']:>10.1f}"
                  f"{tflops:>9.1f}{tflops / args.peak_tflops:>8.1%}")


if __name__ == "__main__":
    main()
