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
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--mask", default=None,
                       help="mask of the reference image (grayscale, white = dominant part, the image's size); "
                            "default: <stem>-segmask.png (or -segmask.jpg, -seg.png) beside --image when there is "
                            "one, as `offset index` does, else the mask pipeline's when --captioner/--segmenter "
                            "are given (with --ref-id: its stored mask)")
    given.add_argument("--box", default=None, metavar="x0,y0,x1,y1",
                       help="mark this box of the reference as the part that matters (pixels; x1, y1 exclusive)")
    given.add_argument("--whole-image", action="store_true", help="mark the whole reference image as dominant")
    parser.add_argument("--checkpoint", default=None, help="override the checkpoint recorded in the index")
    parser.add_argument("--captioner", default=None, help="mask pipeline: local captioner model folder")
    parser.add_argument("--segmenter", default=None, help="mask pipeline: local CLIPSeg model folder")
    parser.add_argument("--exact", action="store_true", help="exact search even when the index has FAISS")
    parser.add_argument("--out", default=None, help="draw a contact sheet (reference, text, results) to this PNG")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    from offset_cir.commands.serve import add_precision_argument

    add_precision_argument(parser, "fp32")  # one query: a calibration would cost more than it saves
    from offset_cir.commands._baseline_flags import add_query_baseline_arguments

    add_query_baseline_arguments(parser)


def _mask_beside(image: str):
    """``<stem>-segmask.png`` (or another name `offset index` looks for) beside ``image``, or None."""
    from pathlib import Path

    from offset_cir.masks.layout import find_mask

    return find_mask(Path(image))


def run(args: argparse.Namespace) -> int:
    import sys

    from offset_cir.errors import UserInputError
    from offset_cir.search.index import Index
    from offset_cir.search.inputs import load_pil, make_mask_generator, short_repr

    if args.k < 1:
        raise UserInputError(f"-k must be at least 1, got {args.k}")
    index = Index.open(args.index, checkpoint=args.checkpoint, device=args.device, precision=args.precision,
                       baseline=args.baseline, pretrained=args.pretrained,
                       mask_generator=make_mask_generator(args.captioner, args.segmenter, args.device))
    if index.baseline is not None:
        print(f"query: {index.model.label()}", file=sys.stderr)
    if args.precision != "fp32":
        print(f"query: {index.precision.describe()}", file=sys.stderr)
    if args.ref_id is not None and args.ref_id not in index:
        raise UserInputError(f"no image with id {short_repr(args.ref_id)} in index {args.index}")
    reference = index.item(args.ref_id)["path"] if args.ref_id is not None else args.image
    image = load_pil(reference, "reference image")
    used, how = _query_mask(args, index, image, reference)
    shown = "" if used.extent is None else f": {used.extent.describe()}"
    print(f"mask: {how}{shown}", file=sys.stderr)
    query = index.encode_query(image, args.text, mask=used.image)
    hits = index.rank(query, args.k, exclude_id=args.ref_id, exact=args.exact)
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


def _query_mask(args, index, image, reference):
    """(the QueryMask the search uses, how it was chosen in words): --box, --whole-image or --mask when given;
    else a gallery reference's stored mask, or the mask beside --image; else the mask pipeline's."""
    from offset_cir.search.query_mask import parse_box, query_mask

    if not index.uses_query_mask:
        return query_mask(image, "none"), "none (this model uses no mask)"
    if args.box is not None:
        return query_mask(image, "box", box=parse_box(args.box)), f"the box {args.box} (--box)"
    if args.whole_image:
        return query_mask(image, "whole"), "the whole image (--whole-image)"
    if args.mask is not None:
        return query_mask(image, "uploaded", mask=args.mask, image_source=reference), f"{args.mask} (--mask)"
    stored = index.item(args.ref_id).get("mask") if args.ref_id is not None else _mask_beside(args.image)
    if stored is not None:
        how = "stored in the index" if args.ref_id is not None else "found beside the image"
        return (query_mask(image, "stored" if args.ref_id else "uploaded", mask=str(stored), image_source=reference),
                f"{stored} ({how}; --mask FILE, --box or --whole-image give another)")
    if index.mask_generator is not None:
        return query_mask(image, "generated", generator=index.mask_generator), "made by the mask pipeline"
    raise _no_mask_error(args)


def _no_mask_error(args):
    from offset_cir.errors import UserInputError

    if args.ref_id is not None:
        return UserInputError(
            f"this model was trained with masks and gallery image {args.ref_id!r} has no stored mask: add "
            f"{args.ref_id}-segmask.png and update the index (`offset index`), give --box x0,y0,x1,y1, "
            f"--whole-image, or the mask pipeline (--captioner DIR --segmenter DIR)")
    return UserInputError(
        f"this model was trained with masks and {args.image} has none: give --mask FILE (grayscale, white = the "
        f"part that matters, the image's size), --box x0,y0,x1,y1 or --whole-image, put "
        f"{_stem(args.image)}-segmask.png beside the image, or give the mask pipeline (--captioner DIR "
        f"--segmenter DIR)")


def _stem(image: str) -> str:
    from pathlib import Path

    return Path(image).stem
