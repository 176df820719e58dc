"""``offset masks``: dominant-portion masks for a benchmark release or an image folder (docs/model.md#masks and #data)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

NAME = "masks"
HELP = "dominant-portion masks for a benchmark or an image folder"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from offset_cir.masks.geometry import GEOMETRIES
    from offset_cir.masks.layout import DATASETS
    from offset_cir.masks.models import DEFAULT_CAPTIONER, DEFAULT_SEGMENTER

    src = parser.add_argument_group("what to segment (one of)")
    src.add_argument("--dataset", choices=DATASETS, help="a benchmark in its release layout under --root")
    src.add_argument("--root", type=Path, help="the benchmark's folder (with --dataset)")
    src.add_argument("--images", type=Path, metavar="DIR", help="any folder of images (walked recursively)")
    out = parser.add_argument_group("where masks go")
    out.add_argument("--out", type=Path, metavar="DIR",
                     help="output root: required with --images (masks are DIR/<sub folders>/<stem>-segmask.png); "
                          "with --dataset it relocates the release layout (default: --root)")
    out.add_argument("--mask-pattern", metavar="PATTERN",
                     help="own mask naming, fields {root} {out} {rel_parent} {parent} {stem} {name} {ext}, "
                          "e.g. '{parent}/{stem}_mask.png'")
    out.add_argument("--captions-out", type=Path, metavar="FILE",
                     help="JSON of the captions used (default: <out or root>/segmask-captions.json)")
    out.add_argument("--overwrite", action="store_true", help="redo masks (and captions) that already exist")
    mod = parser.add_argument_group("models and prompts")
    mod.add_argument("--captions", type=Path, metavar="FILE",
                     help="JSON {image name: caption} (relative path, file name or stem); no captioner is built "
                          "when it covers every image")
    mod.add_argument("--captioner", default=DEFAULT_CAPTIONER, metavar="NAME_OR_DIR",
                     help=f"transformers image-to-text model, hub name or local folder (default {DEFAULT_CAPTIONER})")
    mod.add_argument("--segmenter", default=DEFAULT_SEGMENTER, metavar="NAME_OR_DIR",
                     help=f"CLIPSeg model, hub name or local folder (default {DEFAULT_SEGMENTER})")
    mod.add_argument("--prompt-template", default="{caption}",
                     help="CLIPSeg prompt, fields {caption} {category} {stem} (default '{caption}')")
    mod.add_argument("--fixed-prompt", help="one prompt for every image (e.g. a category name); no captioner")
    mod.add_argument("--geometry", choices=GEOMETRIES, default="letterbox",
                     help="letterbox (default: pad to a square, aligned masks) or squash (the release)")
    mod.add_argument("--max-new-tokens", type=int, default=30, help="caption length limit (tokens)")
    run = parser.add_argument_group("running")
    run.add_argument("--batch-size", type=int, default=8, help="images captioned and segmented per forward pass")
    run.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    run.add_argument("--dtype", default="auto", help="auto (bf16/fp16 on GPU, fp32 on CPU), float32, float16, bfloat16")
    run.add_argument("--workers", type=int, default=4, help="threads decoding images and checking masks")
    run.add_argument("--limit", type=int, help="only the first N images (a trial run)")
    run.add_argument("--shard", metavar="I/N",
                     help="run part I of N (0-based) of the images, e.g. one per GPU or machine; the last part to "
                          "finish merges the captions and prints one summary (under torchrun: the rank's part; "
                          "default: all)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from offset_cir.errors import UserInputError
    from offset_cir.masks.generator import MaskGenerator
    from offset_cir.masks.layout import find_images, get_layout
    from offset_cir.masks.pipeline import CAPTIONS_FILE, plan, read_captions, run_masks

    if (args.dataset is None) == (args.images is None):
        raise UserInputError("give exactly one of --dataset NAME --root DIR, or --images DIR --out DIR")
    if args.dataset is not None:
        if args.root is None:
            raise UserInputError(f"--dataset {args.dataset} needs --root DIR (the benchmark's folder)")
        layout_name, root = args.dataset, args.root
    else:
        if args.out is None:
            raise UserInputError("--images DIR needs --out DIR (where the masks go)")
        layout_name, root = "images", args.images
    layout = get_layout(layout_name, args.mask_pattern)
    images = find_images(layout_name, root, exclude=(args.out,) if args.out is not None else ())
    if args.limit is not None:
        images = images[: max(0, args.limit)]
    jobs = plan(images, root, layout, args.out)
    captions = read_captions(args.captions) if args.captions is not None else None
    if captions is not None:
        from offset_cir.masks.pipeline import lookup_caption

        covered = sum(lookup_caption(captions, job) is not None for job in jobs)
        logger.info("--captions %s covers %d of %d images", args.captions, covered, len(jobs))
    captions_out = args.captions_out or Path(args.out if args.out is not None else root) / CAPTIONS_FILE
    generator = MaskGenerator(
        captioner=args.captioner, segmenter=args.segmenter, geometry=args.geometry, device=args.device,
        batch_size=args.batch_size, prompt_template=args.prompt_template, fixed_prompt=args.fixed_prompt,
        dtype=args.dtype, max_new_tokens=args.max_new_tokens,
    )
    shard = _shard(args)
    logger.info("%d images (%s layout, masks like %s)%s", len(jobs), layout_name, jobs[0].mask if jobs else "-",
                f", shard {shard}" if shard.count > 1 else "")
    report = run_masks(jobs, generator, captions_out=captions_out, captions=captions, overwrite=args.overwrite,
                       workers=args.workers, progress=not args.no_progress, shard=shard)
    if shard.count > 1:
        merged = _merge_shards(report, jobs, generator.batch_size, captions_out, shard)
        if merged is None:
            print(f"shard {shard}: {report.summary()}\n(the last shard to finish prints the merged summary)",
                  file=sys.stderr if report.failed else sys.stdout)
            return 0 if report.ok else 1
        report = merged
    print(report.summary(), file=sys.stderr if report.failed else sys.stdout)
    return 0 if report.ok else 1


def _shard(args):
    from offset_cir.errors import UserInputError
    from offset_cir.masks.shards import Shard

    under_torchrun = Shard.from_torchrun()
    if args.shard is None:
        return under_torchrun or Shard()
    if under_torchrun is not None:
        raise UserInputError(f"--shard {args.shard} under torchrun: each rank runs its own part already; drop --shard")
    return Shard.parse(args.shard)


def _merge_shards(report, jobs, batch_size: int, captions_out, shard):
    """Leave this shard's report; the merged report when every shard's is there, else None."""
    from offset_cir.masks.shards import merge, plan_fingerprint, write_report

    fingerprint = plan_fingerprint(jobs, batch_size)
    write_report(report, captions_out, shard, fingerprint)
    return merge(captions_out, shard.count, fingerprint)
