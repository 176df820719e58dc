"""``offset validate-submission FILE``: check a CIRR test-server file offline (SPEC section 7)."""
from __future__ import annotations

import argparse
from pathlib import Path

NAME = "validate-submission"
HELP = "check a CIRR test-server file offline"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="+", help="submission JSON file(s)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--root", help="CIRR folder (holding cirr/captions and cirr/image_splits, or captions/ directly)")
    where.add_argument("--annotations", help="folder holding captions/ and image_splits/")
    parser.add_argument("--split", default="test1")
    parser.add_argument("--version", default="rc2")
    parser.add_argument("--metric", choices=["recall", "recall_subset"], help="expected metric (default: the file's)")


def run(args) -> int:
    from offset_cir.data import get_dataset
    from offset_cir.eval.cirr_submission import validate_submission

    root = args.root or args.annotations
    bench = get_dataset("cirr", root, version=args.version,
                        **({"annotations": args.annotations} if args.annotations else {}))
    failed = 0
    for f in args.file:
        problems = validate_submission(Path(f), bench, args.split, version=args.version, metric=args.metric)
        if problems:
            failed += 1
            print(f"{f}: FAILED")
            for line in problems:
                print(f"  {line}")
        else:
            print(f"{f}: OK")
    return 1 if failed else 0
