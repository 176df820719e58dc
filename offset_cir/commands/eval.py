"""``offset eval``: evaluate a checkpoint on a benchmark protocol (SPEC section 7)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from offset_cir.errors import UserInputError

NAME = "eval"
HELP = "evaluate a checkpoint on a benchmark protocol"
log = logging.getLogger(__name__)


def _value(text: str):
    low = text.lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low == "none":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def add_dataset_arguments(parser: argparse.ArgumentParser, dataset_flag: bool = True) -> None:
    """--dataset/--root and the location settings shared by eval, submit and doctor."""
    if dataset_flag:
        parser.add_argument("--dataset", required=True, help="fashioniq, shoes, cirr, fashion200k or synthetic")
    parser.add_argument("--root", required=True, help="the benchmark's folder (release layout, SPEC section 6)")
    parser.add_argument("--annotations", help="folder of the annotation files, if not under --root")
    parser.add_argument("--image-root", help="folder of the images, if not the release location")
    parser.add_argument("--mask-root", help="folder of the masks (same relative layout), if not beside the images")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other loader setting, e.g. categories=dress, correction_dicts=DIR (repeatable)")


def dataset_settings(args) -> dict:
    settings = {}
    for key in ("annotations", "image_root", "mask_root"):
        if getattr(args, key, None):
            settings[key] = getattr(args, key)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"--set expects KEY=VALUE, got {item!r}")
        settings[key.strip().replace("-", "_")] = _value(value.strip())
    return settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    parser.add_argument("--checkpoint", required=True, help="checkpoint saved by offset train (safetensors + JSON)")
    parser.add_argument("--protocol", help="fashioniq, fashioniq-union, fashioniq-full, shoes, cirr-val, synthetic, "
                                           "fashion200k-tirg (default: the dataset's)")
    parser.add_argument("--split", help="split to evaluate (default: the protocol's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--out", help="results JSON (default: runs/eval/<dataset>-<protocol>-<split>.json)")
    parser.add_argument("--rankings", help="also write the top-50 gallery ids per query (JSON Lines)")
    parser.add_argument("--query-transform", choices=["eval", "train"],
                        help="reference-image transform (SPEC 4, A2; default: train for FashionIQ as the release, "
                             "eval elsewhere)")


def default_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def run(args) -> int:
    import offset_cir
    from offset_cir.data import get_dataset
    from offset_cir.eval.evaluate import evaluate, format_table, get_protocol

    bench = get_dataset(args.dataset, args.root, **dataset_settings(args))
    proto = get_protocol(args.protocol, bench)  # fail before loading a large checkpoint
    device = default_device(args.device)
    model = offset_cir.load_checkpoint(args.checkpoint).to(device)
    if not model.needs_masks:
        bench.use_masks = False
    result = evaluate(model, bench, proto.name, split=args.split, batch_size=args.batch_size,
                      num_workers=args.num_workers, save_rankings=args.rankings, device=device,
                      query_transform=args.query_transform)
    result["checkpoint"] = str(args.checkpoint)
    out = Path(args.out or f"runs/eval/{bench.name}-{result['protocol']}-{result['split']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(format_table(result))
    print(f"results: {out}")
    return 0
