"""Mask generation speed: tiny random BLIP + CLIPSeg on CPU at batch 1, 8 and 32, plus FLOP counts.

    .venv/bin/python benchmarks/mask_speed.py            # masks/second table (tiny models, CPU)
    .venv/bin/python benchmarks/mask_speed.py --flops    # also FLOPs per image of the real BLIP-2 opt-2.7b and
                                                         # CLIPSeg rd64-refined (meta-device models, no weights)

The tiny models have the real pipeline around them (processors, geometry, PNG writing, captions JSON), so the
rate measures the per-image overhead that remains once the networks are fast; the FLOP table is what a GPU
has to compute per image for the real models (see docs/masks.md for the images/hour estimate).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _quiet():
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("offset_cir").setLevel(logging.WARNING)


def speed_table(n_images: int, batch_sizes: list[int], size: tuple[int, int], threads: int) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from offset_cir.masks import MaskGenerator, find_images, get_layout, plan, run_masks
    from offset_cir.testing.masks import build_tiny_blip, build_tiny_clipseg

    torch.set_num_threads(threads)
    _quiet()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        blip, clipseg = build_tiny_blip(tmp / "blip"), build_tiny_clipseg(tmp / "clipseg")
        rng = np.random.default_rng(0)
        (tmp / "img").mkdir()
        for i in range(n_images):
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp / "img" / f"{i:04d}.jpg")
        images = find_images("images", tmp / "img")
        pil = [Image.open(p).convert("RGB") for p in images]
        print(f"tiny BLIP captioner + tiny CLIPSeg segmenter (input 64x64), {n_images} images of {size[0]}x{size[1]}, "
              f"CPU, torch threads {threads}")
        print(f"{'batch':>5} | {'caption img/s':>13} | {'segment img/s':>13} | {'API masks/s':>11} | {'CLI-style masks/s':>17}")
        print("-" * 72)
        for bs in batch_sizes:
            gen = MaskGenerator(captioner=str(blip), segmenter=str(clipseg), batch_size=bs, device="cpu").load(True)
            gen.generate(pil[:bs])  # warm-up
            t0 = time.perf_counter()
            caps = gen.caption(pil)
            t_cap = time.perf_counter() - t0
            t0 = time.perf_counter()
            gen.segment(pil, gen.prompts(caps))
            t_seg = time.perf_counter() - t0
            t0 = time.perf_counter()
            gen(pil)
            t_api = time.perf_counter() - t0
            out = tmp / f"out{bs}"
            jobs = plan(images, tmp / "img", get_layout("images"), out)
            t0 = time.perf_counter()
            report = run_masks(jobs, gen, captions_out=out / "caps.json", progress=False)
            t_cli = time.perf_counter() - t0
            assert report.written == n_images
            print(f"{bs:>5} | {n_images / t_cap:>13.1f} | {n_images / t_seg:>13.1f} | {n_images / t_api:>11.1f} | "
                  f"{n_images / t_cli:>17.1f}")


def flop_table(batch: int = 8, caption_tokens: int = 12) -> None:
    """Forward FLOPs per image of the real models, counted by torch on meta tensors (no weights needed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, CLIPSegConfig,
                              CLIPSegForImageSegmentation, OPTConfig)

    _quiet()
    # Salesforce/blip2-opt-2.7b: EVA ViT-g/14 at 224 (Blip2VisionConfig defaults), Q-Former with 32 queries,
    # OPT-2.7B (hidden 2560, 32 layers, FFN 10240, 32 heads).
    opt = OPTConfig(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                    word_embed_proj_dim=2560, vocab_size=50272, max_position_embeddings=2048)
    blip2_cfg = Blip2Config(text_config=opt.to_dict(), num_query_tokens=32)
    # CIDAS/clipseg-rd64-refined: CLIP ViT-B/16 (vision 768x12, text 512x12), reduce_dim 64, complex upsampling.
    seg_cfg = CLIPSegConfig(vision_config=dict(patch_size=16), reduce_dim=64, use_complex_transposed_convolution=True)
    with torch.device("meta"):
        blip2 = Blip2ForConditionalGeneration(blip2_cfg).eval()
        clipseg = CLIPSegForImageSegmentation(seg_cfg).eval()
    for p in list(blip2.parameters()) + list(clipseg.parameters()):
        p.requires_grad_(False)
    nparams = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    rows = []
    with torch.no_grad():
        pix = torch.empty(batch, 3, 224, 224, device="meta")
        with FlopCounterMode(display=False) as fc:
            vis = blip2.vision_model(pixel_values=pix).last_hidden_state
        rows.append(("BLIP-2 vision ViT-g/14 @224", nparams(blip2.vision_model), fc.get_total_flops() / batch))
        q = blip2.query_tokens.expand(batch, -1, -1)
        with FlopCounterMode(display=False) as fc:
            qo = blip2.qformer(query_embeds=q, encoder_hidden_states=vis)
            blip2.language_projection(qo.last_hidden_state)
        rows.append(("BLIP-2 Q-Former + projection", nparams(blip2.qformer), fc.get_total_flops() / batch))
        lm = blip2.language_model
        n_prefix = blip2_cfg.num_query_tokens + 1
        emb = torch.empty(batch, n_prefix, opt.hidden_size, device="meta")
        with FlopCounterMode(display=False) as fc:
            lm(inputs_embeds=emb, use_cache=False)
        prefill = fc.get_total_flops() / batch
        rows.append((f"OPT-2.7B prefill ({n_prefix} tokens)", nparams(lm), prefill))
        # Each new token costs about 2 FLOPs per non-embedding weight plus the LM head (KV cache reused).
        per_token = 2 * (nparams(lm) - lm.get_input_embeddings().weight.numel()) + 2 * opt.hidden_size * opt.vocab_size
        rows.append((f"OPT-2.7B decode ({caption_tokens} tokens, KV cache)", 0, per_token * caption_tokens))
        pix = torch.empty(batch, 3, 352, 352, device="meta")
        ids = torch.zeros(batch, 16, dtype=torch.long, device="meta")
        with FlopCounterMode(display=False) as fc:
            clipseg(input_ids=ids, pixel_values=pix)
        rows.append(("CLIPSeg rd64-refined @352 (16 text tokens)", nparams(clipseg), fc.get_total_flops() / batch))
    print(f"\nforward FLOPs per image (counted on meta tensors, batch {batch})")
    print(f"{'part':<44} | {'params (M)':>10} | {'GFLOP/image':>11}")
    print("-" * 72)
    for name, n, fl in rows:
        print(f"{name:<44} | {n / 1e6:>10.0f} | {fl / 1e9:>11.1f}")
    total = sum(r[2] for r in rows)
    print(f"{'total':<44} | {'':>10} | {total / 1e9:>11.1f}")
    for tflops in (100, 200, 400):
        print(f"at {tflops} TFLOP/s sustained: {tflops * 1e12 / total * 3600:,.0f} images/hour (compute bound)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--size", type=int, nargs=2, default=[320, 240], metavar=("W", "H"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flops", action="store_true", help="also count FLOPs of the real models (meta device)")
    args = ap.parse_args(argv)
    speed_table(args.images, args.batch_sizes, tuple(args.size), args.threads)
    if args.flops:
        flop_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
