"""Training throughput: triplets per second for the `tiny` and `ViT-B-16` backbones, fp32 vs bf16 autocast,
batch 8 and 32, measured on random tensors (the model's cost alone, no image decoding).

    python benchmarks/train_speed.py [--backbones tiny ViT-B-16] [--batches 8 32] [--steps 3]
    python benchmarks/train_speed.py --families [BACKBONE ...]   # ms/step at batch 2, one row per tower family
    python benchmarks/train_speed.py --small-compute   # efficientnet-lite0-minilm: fine-tuned / frozen / cached
    python benchmarks/train_speed.py --optimizer       # AdamW per-tensor / foreach / fused (the trainer's)
    python benchmarks/train_speed.py --cache-fill      # the feature cache's frozen forward variants, item seeding
    python benchmarks/train_speed.py --live-blocks 2 5 6   # the trainable last blocks over cached features

    python benchmarks/train_speed.py --device cuda [--cuda-backbone ViT-H-14]   # the GPU table only

On a CUDA machine it also reports ViT-H-14 at batch 16 in bf16 and fp16 (with a grad scaler), with and without
gradient checkpointing:
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


# One representative per tower family: random init, fp32, CPU, batch 2.
FAMILY_ROWS = [
    ("OpenCLIP ViT (reference)", "ViT-B-16"),
    ("timm ViT, map pool (SigLIP2)", "ViT-B-16-SigLIP2"),
    ("timm ViT, class token (EVA02)", "EVA02-B-16"),
    ("timm ViT, rope + map (PE)", "PE-Core-B-16"),
    ("OpenCLIP ModifiedResNet", "RN50"),
    ("timm CNN (ConvNeXt)", "convnext_base"),
    ("timm CNN (FastViT, MobileCLIP2)", "MobileCLIP2-S0"),
    ("timm CNN + HF text (packaged)", "efficientnet-lite0-minilm"),
]


def family_rows(steps: int, names: list[str] | None = None) -> None:
    """ms per OFFSET training step (AdamW) at batch 2 for one backbone of each tower family."""
    import gc

    rows = [r for r in FAMILY_ROWS if not names or r[1] in names]
    print(f"tower families: batch 2, fp32, CPU, random init, {steps} timed step(s) after a warm-up")
    head = f"{'family':<34}{'backbone':<28}{'px':>5}{'tokens':>8}{'params M':>10}{'ms/step':>10}"
    print(head)
    print("-" * len(head))
    for family, backbone in rows:
        work = make_workload(backbone, 2, "fp32", "cpu")
        dims = work.model.backbone.dims
        params = sum(p.numel() for p in work.model.parameters()) / 1e6
        work.step()
        t = time.perf_counter()
        for _ in range(steps):
            work.step()
        ms = (time.perf_counter() - t) / steps * 1e3
        print(f"{family:<34}{backbone:<28}{dims.image_size:>5}{dims.grid[0] * dims.grid[1]:>8}{params:>10.1f}{ms:>10.0f}",
              flush=True)
        del work
        gc.collect()


def small_compute_rows(steps: int, batch: int, image_sizes: list[int], image_blocks: int) -> None:
    """efficientnet-lite0-minilm (packaged pretrained): triplets/s fine-tuned, frozen, and frozen + cached
    (offset_cir.train.freeze / .cache). The cached rows read real cache entries of random images (disk + memory)."""
    import tempfile

    import numpy as np
    from PIL import Image

    from offset_cir import ModelConfig, build_model
    from offset_cir.demo import RUNS as DEMO_RUNS
    from offset_cir.train.cache import cached_model
    from offset_cir.train.freeze import freeze_backbone

    name = "efficientnet-lite0-minilm"
    print(f"{name}: batch {batch} triplets (4 images each, 2 without masks), fp32, CPU, {steps} timed steps after "
          f"a warm-up; 'last N' = the image tower's last N blocks train; 'demo:' rows = the demo's other two runs")
    head = f"{'mode':<34}{'px':>5}{'triplets/s':>12}{'s/step':>9}{'vs fine-tuned':>15}"
    print(head)
    print("-" * len(head))
    rng = np.random.default_rng(0)
    texts = [f"replace the red circle by a blue striped star number {i}" for i in range(batch)]
    for size in image_sizes:
        pils = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(4 * batch)]
        base = None
        # the last three rows: the demo's preset (offset_cir/configs/demo.yaml: frozen + cached) for each of the
        # demo's three runs; w/o FM and late fusion encode no masks (2 images per triplet)
        for mode, ablations in (("fine-tuned", ()), ("frozen", ()), (f"frozen, last {image_blocks}", ()),
                                ("frozen + cached", ()), (f"frozen, last {image_blocks} + cached", ()),
                                ("demo: frozen + cached, w/o FM", DEMO_RUNS["offset_wo_fm"]),
                                ("demo: frozen + cached, late fusion", DEMO_RUNS["late_fusion"])):
            import dataclasses

            from offset_cir.model import packaged

            spec = packaged.PACKAGED_BACKBONES[name]
            packaged.PACKAGED_BACKBONES[name] = dataclasses.replace(spec, image_size=size)
            try:
                torch.manual_seed(0)
                model_cfg = ModelConfig(backbone=name, pretrained="packaged")
                if ablations:
                    model_cfg = model_cfg.with_ablation(*ablations)
                model = build_model(model_cfg).train()
            finally:
                packaged.PACKAGED_BACKBONES[name] = spec
            blocks = image_blocks if "last" in mode else 0
            if mode != "fine-tuned":
                freeze_backbone(model, image_blocks=blocks)
            tmp = tempfile.TemporaryDirectory()
            if "cached" in mode:
                cached_model(model, tmp.name, image_blocks=blocks)
            opt = torch.optim.AdamW(model.parameter_groups(1e-5, 1e-4))

            def step() -> None:
                if ablations:  # no masks: 2 images per triplet, the mask images are neither encoded nor passed
                    ref, tgt = torch.stack([model.preprocess.image(p) for p in pils[:2 * batch]]).split(batch)
                    ref_m = tgt_m = None
                else:
                    x = torch.stack([model.preprocess.image(p) for p in pils])
                    ref, ref_m, tgt, tgt_m = x.split(batch)
                model.compute_loss(ref, ref_m, texts, tgt, tgt_m)["total"].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()  # warm-up (fills the cache in the cached modes)
            t = time.perf_counter()
            for _ in range(steps):
                step()
            dt = (time.perf_counter() - t) / steps
            base = base or dt
            print(f"{mode:<34}{size:>5}{batch / dt:>12.2f}{dt:>9.3f}{base / dt:>14.1f}x", flush=True)
            tmp.cleanup()
            del model, opt


def optimizer_rows(steps: int) -> None:
    """AdamW over the demo's trainable parameters (OFFSET on efficientnet-lite0-minilm, backbone frozen): the
    per-tensor loop (torch's CPU default), the multi-tensor loop and the fused kernel the trainer uses."""
    from offset_cir import ModelConfig, build_model
    from offset_cir.train.freeze import freeze_backbone

    model = build_model(ModelConfig(backbone="efficientnet-lite0-minilm", pretrained=None))
    freeze_backbone(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    print(f"AdamW step over {sum(p.numel() for p in params) / 1e6:.1f} M trainable parameters, "
          f"CPU threads {torch.get_num_threads()}, {steps} timed steps after a warm-up")
    print(f"{'implementation':<16}{'ms/step':>9}{'speed-up':>10}")
    base = None
    for name, kw in (("per-tensor", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=1e-4, **kw)
        opt.step()
        t = time.perf_counter()
        for _ in range(steps):
            opt.step()
        dt = (time.perf_counter() - t) / steps
        base = base or dt
        print(f"{name:<16}{dt * 1000:>9.1f}{base / dt:>9.1f}x", flush=True)


def cache_fill_rows(steps: int) -> None:
    """What the feature cache's frozen part costs per batch of 64 images at 64 px (efficientnet-lite0-minilm): the
    tower as built, channels-last, and the copy the cache runs (batch norms folded + channels-last); and the cost of
    seeding one training item with torch.manual_seed vs the CPU generator alone (ItemSeededDataset)."""
    import copy

    from offset_cir.model.packaged import create_packaged_clip
    from offset_cir.train.tower_split import fold_batch_norms

    trunk = create_packaged_clip("efficientnet-lite0-minilm", None).visual.trunk.eval()
    x = torch.randn(64, 3, 64, 64)
    cl = copy.deepcopy(trunk).to(memory_format=torch.channels_last)
    folded = copy.deepcopy(trunk)
    fold_batch_norms(folded)
    folded = folded.to(memory_format=torch.channels_last)
    variants = [("as built", trunk, x), ("channels-last", cl, x.contiguous(memory_format=torch.channels_last)),
                ("folded + channels-last", folded, x.contiguous(memory_format=torch.channels_last))]
    print(f"frozen tower forward, batch 64 at 64 px, CPU threads {torch.get_num_threads()}, {steps} timed calls")
    print(f"{'variant':<26}{'ms/batch':>10}{'speed-up':>10}")
    base = None
    with torch.inference_mode():
        for name, module, inp in variants:
            module.forward_features(inp)
            t = time.perf_counter()
            for _ in range(steps):
                module.forward_features(inp)
            dt = (time.perf_counter() - t) / steps
            base = base or dt
            print(f"{name:<26}{dt * 1000:>10.1f}{base / dt:>9.1f}x", flush=True)
    n = 2000
    for name, seed in (("torch.manual_seed", torch.manual_seed), ("CPU generator only", torch.default_generator.manual_seed)):
        t = time.perf_counter()
        for i in range(n):
            with torch.random.fork_rng(devices=[]):
                seed(i)
        print(f"seeding one item, {name:<20}{(time.perf_counter() - t) / n * 1000:>8.3f} ms", flush=True)


def live_blocks_rows(steps: int, counts: list[int], batch: int = 128) -> None:
    """What the trainable last N image blocks cost per training step over cached features (efficientnet-lite0-minilm,
    64 px; ``batch`` cached maps): forward and backward of the blocks and the head, NCHW as the cache stores them,
    channels-last (what ``ImageSplit.live`` runs), and channels-last under bf16 autocast (what it does not run on
    CPUs: there it turns autocast off for the blocks)."""
    from offset_cir.model.packaged import create_packaged_clip

    trunk = create_packaged_clip("efficientnet-lite0-minilm", None).visual.trunk.train()
    flat = [b for stage in trunk.blocks for b in stage]
    print(f"trainable last blocks + head, forward + backward of {batch} cached maps at 64 px, CPU threads "
          f"{torch.get_num_threads()}, {steps} timed calls")
    print(f"{'blocks':>6}{'input':>14}{'NCHW ms':>10}{'channels-last ms':>18}{'+ bf16 autocast ms':>20}")
    for n in counts:
        with torch.no_grad():
            h = trunk.bn1(trunk.conv_stem(torch.zeros(1, 3, 64, 64)))
            for block in flat[: len(flat) - n]:
                h = block(h)
        x = torch.randn(batch, *h.shape[1:])
        cl = x.contiguous(memory_format=torch.channels_last)
        times = []
        for inp, bf16 in ((x, False), (cl, False), (cl, True)):
            def step(inp=inp, bf16=bf16) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    y = inp
                    for block in flat[len(flat) - n:]:
                        y = block(y)
                    y = trunk.bn2(trunk.conv_head(y))
                y.float().square().mean().backward()

            step()
            t = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - t) / steps * 1000)
        shape = "x".join(map(str, h.shape[1:]))
        print(f"{n:>6}{shape:>14}{times[0]:>10.1f}{times[1]:>18.1f}{times[2]:>20.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["tiny", "ViT-B-16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--families", nargs="*", default=None, metavar="BACKBONE",
                    help="only the tower-family table (batch 2, ms/step): all families, or the backbones named")
    ap.add_argument("--family-steps", type=int, default=1)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="cpu: the CPU table only; cuda: the GPU table only; auto: the CPU table, then the GPU one if any")
    ap.add_argument("--cuda-backbone", default="ViT-H-14", help="backbone of the GPU table (random init)")
    ap.add_argument("--cuda-batch", type=int, default=16)
    ap.add_argument("--small-compute", action="store_true",
                    help="only the efficientnet-lite0-minilm table: fine-tuned vs frozen vs frozen + cached")
    ap.add_argument("--small-compute-sizes", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--small-compute-blocks", type=int, default=2)
    ap.add_argument("--optimizer", action="store_true",
                    help="only the AdamW table: per-tensor vs foreach vs fused, over the demo's trainable parameters")
    ap.add_argument("--cache-fill", action="store_true",
                    help="only the feature-cache table: the frozen tower as built / channels-last / folded, and item seeding")
    ap.add_argument("--live-blocks", type=int, nargs="+", metavar="N",
                    help="only the trainable-blocks table: the last N blocks over cached features, NCHW / channels-last / bf16")
    args = ap.parse_args()
    if args.live_blocks:
        live_blocks_rows(max(args.steps, 3), args.live_blocks)
        return
    if args.cache_fill:
        cache_fill_rows(max(args.steps, 8))
        return
    if args.optimizer:
        optimizer_rows(max(args.steps, 10))
        return
    if args.small_compute:
        small_compute_rows(args.steps, 32, args.small_compute_sizes, args.small_compute_blocks)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.families is not None:
        family_rows(args.family_steps, args.families)
        return
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, {args.steps} timed steps after a warm-up")
    head = f"{'device':<7}{'backbone':<10}{'batch':>6}{'precision':>10}{'triplets/s':>12}{'s/step':>9}{'bf16 vs fp32':>14}"
    if args.device != "cuda":
        print(head)
        print("-" * len(head))
    for backbone in (args.backbones if args.device != "cuda" else []):
        for batch in args.batches:
            res = {p: run(backbone, batch, p, args.steps, "cpu") for p in ("fp32", "bf16")}
            for p, r in res.items():
                ratio = r["triplets_s"] / res["fp32"]["triplets_s"]
                print(f"{'cpu':<7}{backbone:<10}{batch:>6}{p:>10}{r['triplets_s']:>12.2f}{r['step_s']:>9.3f}{ratio:>13.2f}x")
    if torch.cuda.is_available() and args.device != "cpu":
        print()
        print(f"GPU {torch.cuda.get_device_name()}, {args.cuda_backbone} random init, batch {args.cuda_batch}; "
              f"'of peak' against --peak-tflops {args.peak_tflops:g}")
        head = (f"{'device':<7}{'backbone':<10}{'batch':>6}{'precision':>10}{'grad ckpt':>10}{'triplets/s':>12}"
                f"{'peak GiB':>10}{'TFLOP/s':>9}{'of peak':>9}")
        print(head)
        print("-" * len(head))
        for precision in ("bf16", "fp16"):
            for ckpt in (False, True):
                r = run(args.cuda_backbone, args.cuda_batch, precision, args.steps, "cuda", grad_ckpt=ckpt)
                tflops = r["flops_per_step"] / r["step_s"] / 1e12
                print(f"{'cuda':<7}{args.cuda_backbone:<10}{args.cuda_batch:>6}{precision:>10}{str(ckpt):>10}"
                      f"{r['triplets_s']:>12.2f}{r['peak_gib']:>10.1f}{tflops:>9.1f}{tflops / args.peak_tflops:>8.1%}",
                      flush=True)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
