"""``offset search``: query a search index with a reference image (or a gallery id) and a modification text."""
from __future__ import annotations

import argparse
import json

NAME = "search"
HELP = "query a search index with an image and a text"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index folder made by `offset index`")
    ref = parser.add_mutually_exclusive_group(required=True)
    ref.add_argument("--image", help="reference image file")
    ref.add_argument("--ref-id", help="a gallery image id as reference (uses its stored mask, excluded from results)")
    parser.add_argument("--text", required=True, help="modification text, e.g. 'make it red'")
    parser.add_argument("-k", type=int, default=10, help="number of results")
    parser.add_argument("--mask", default=None,
                        help="mask of the reference image (grayscale, white = dominant part, the image's size); "
                             "default: <stem>-segmask.png (or -segmask.jpg, -seg.png) beside --image when there is "
                             "one, as `offset index` does")
    parser.add_argument("--checkpoint", default=None, help="override the checkpoint recorded in the index")
    parser.add_argument("--captioner", default=None, help="mask pipeline: local captioner model folder")
    parser.add_argument("--segmenter", default=None, help="mask pipeline: local CLIPSeg model folder")
    parser.add_argument("--exact", action="store_true", help="exact search even when the index has FAISS")
    parser.add_argument("--out", default=None, help="draw a contact sheet (reference, text, results) to this PNG")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    from offset_cir.commands.serve import add_precision_argument

    add_precision_argument(parser, "fp32")  # one query: a calibration would cost more than it saves


def _mask_beside(image: str):
    """``<stem>-segmask.png`` (or another name `offset index` looks for) beside ``image``, or None."""
    from pathlib import Path

    from offset_cir.masks.layout import find_mask

    return find_mask(Path(image))


def run(args: argparse.Namespace) -> int:
    import sys

    from offset_cir.errors import UserInputError
    from offset_cir.search.index import Index, MaskRequiredError
    from offset_cir.search.inputs import make_mask_generator

    if args.k < 1:
        raise UserInputError(f"-k must be at least 1, got {args.k}")
    index = Index.open(args.index, checkpoint=args.checkpoint, device=args.device, precision=args.precision,
                       mask_generator=make_mask_generator(args.captioner, args.segmenter, args.device))
    if args.precision != "fp32":
        print(f"query: {index.precision.describe()}", file=sys.stderr)
    mask = args.mask
    if args.image is not None and mask is None and index.uses_query_mask:
        found = _mask_beside(args.image)
        if found is not None:
            mask = str(found)
            print(f"mask: {found} (found beside the image; --mask FILE gives another)", file=sys.stderr)
        elif index.mask_generator is not None:
            print("mask: made by the mask pipeline (--captioner/--segmenter)", file=sys.stderr)
    try:
        if args.ref_id is not None:
            hits = index.search_id(args.ref_id, args.text, args.k, exact=args.exact)
            reference = index.item(args.ref_id)["path"]
        else:
            hits = index.search(args.image, args.text, args.k, mask=mask, exact=args.exact)
            reference = args.image
    except MaskRequiredError:
        if args.ref_id is not None:
            raise UserInputError(
                f"this model was trained with masks and gallery image {args.ref_id!r} has no stored mask: add "
                f"{args.ref_id}-segmask.png and update the index (`offset index`), or give the mask pipeline "
                f"(--captioner DIR --segmenter DIR)") from None
        raise UserInputError(
            f"this model was trained with masks and {args.image} has none: give --mask FILE (grayscale, white = "
            f"the part that matters, the image's size), put {_stem(args.image)}-segmask.png beside the image, or "
            f"give the mask pipeline (--captioner DIR --segmenter DIR)") from None
    if args.json:
        print(json.dumps([{"rank": i + 1, "id": h.id, "path": h.path, "score": h.score}
                          for i, h in enumerate(hits)], indent=1))
    else:
        w = max([2] + [len(h.id) for h in hits])
        print(f"{'rank':>4}  {'id':<{w}}  {'score':>8}  path")
        for i, h in enumerate(hits, 1):
            print(f"{i:>4}  {h.id:<{w}}  {h.score:8.4f}  {h.path}")
    if args.out:
        from offset_cir.search.sheet import contact_sheet

        print(f"contact sheet: {contact_sheet(reference, args.text, hits, args.out)}")
    return 0


def _stem(image: str) -> str:
    from pathlib import Path

    return Path(image).stem
