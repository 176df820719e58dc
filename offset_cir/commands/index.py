"""``offset index``: encode a folder of images into a search index (see ``offset_cir.search.build``), with a trained
checkpoint or a training-free baseline (a backbone's own features)."""
from __future__ import annotations

import argparse

from offset_cir.errors import UserInputError

NAME = "index"
HELP = "encode a folder of images into a search index"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="trained OFFSET checkpoint (file or folder); with --baseline, whose "
                                             "backbone to use")
    parser.add_argument("--images", required=True, help="folder of gallery images (searched recursively)")
    parser.add_argument("--out", required=True, help="index folder to create or update")
    parser.add_argument("--masks", default=None,
                        help="folder with <stem>-segmask.png masks (default: beside each image)")
    parser.add_argument("--captioner", default=None, help="mask pipeline: local captioner model folder")
    parser.add_argument("--segmenter", default=None, help="mask pipeline: local CLIPSeg model folder")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per resumable shard")
    parser.add_argument("--dtype", choices=["float16", "float32"], default=None,
                        help="feature storage (default: the existing index's, else float16)")
    parser.add_argument("--exact-max", type=int, default=None,
                        help="galleries below this size are searched exactly (default 100000)")
    parser.add_argument("--hnsw-max", type=int, default=None,
                        help="galleries below this size use HNSW, larger ones IVF (default 1000000)")
    parser.add_argument("--prune", action="store_true", help="drop indexed images that left the folder")
    parser.add_argument("--limit", type=int, default=None, help="encode at most this many new images now")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                        help="encode with torch or onnxruntime (CPU); the same features within float tolerance")
    parser.add_argument("--onnx", default=None, metavar="DIR",
                        help="--runtime onnx: folder made by `offset export` (default: export the checkpoint now)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from offset_cir.commands.serve import add_precision_argument

    add_precision_argument(parser, "fp32")  # stored features do not depend on a timing unless asked
    from offset_cir.commands._baseline_flags import add_baseline_arguments

    add_baseline_arguments(parser, "index with the backbone's own global image features (no training, no masks); "
                                   "MODE is the query side searches use by default: the reference image's "
                                   "features, the text's, or their normalised sum")


def run(args: argparse.Namespace) -> int:
    from offset_cir.commands._baseline_flags import baseline_spec, check_model_flags

    check_model_flags(args)  # before any model is loaded
    spec = baseline_spec(args)
    if spec is not None and (args.masks or args.captioner or args.segmenter):
        raise UserInputError(f"--baseline {spec.mode} encodes whole images and uses no mask: drop --masks, "
                             f"--captioner and --segmenter")
    from offset_cir.search import ann
    from offset_cir.search.build import build_index
    from offset_cir.search.inputs import make_mask_generator

    from offset_cir.export.precision import use_precision
    from offset_cir.export.runtime import load_encoder

    gen = make_mask_generator(args.captioner, args.segmenter, args.device)
    # torch or onnxruntime (checked against the checkpoint), or the baseline, then its precision
    model, precision = use_precision(load_encoder(None if spec else args.checkpoint, args.runtime,
                                                  onnx_dir=args.onnx, device=args.device, baseline=spec),
                                     args.precision)
    if spec is not None:
        print(f"{spec.label()}: gallery images by their global image features", flush=True)
    print(f"gallery images: {precision.describe()}", flush=True)
    rep = build_index(
        args.out, args.images, checkpoint=args.checkpoint, model=model, masks_dir=args.masks, mask_generator=gen,
        batch_size=args.batch_size, num_workers=args.workers, shard_size=args.shard_size, dtype=args.dtype,
        exact_max=args.exact_max if args.exact_max is not None else ann.EXACT_MAX,
        hnsw_max=args.hnsw_max if args.hnsw_max is not None else ann.HNSW_MAX,
        prune=args.prune, limit=args.limit, device=args.device, progress=not args.no_progress,
    )
    if rep is not None:  # rank 0
        if rep.ann_table:  # how the approximate search was tuned against exact search
            print(rep.ann_table, flush=True)
        s = rep.search
        extra = ""
        if s["kind"] != "exact":
            extra = f", {s['param_name']}={s['param']}, recall@{s['k']} vs exact {s['recall_at_k']:.4f}"
        print(f"index {rep.path}: {rep.count} images ({rep.encoded} encoded now, {rep.removed} removed, "
              f"{len(rep.skipped)} unreadable); search: {s['kind']}{extra}")
        for sk in rep.skipped[:10]:
            print(f"  unreadable: {sk['path']}: {sk.get('error', '')}")
    return 0
