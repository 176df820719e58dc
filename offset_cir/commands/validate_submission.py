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
    parser.add_argument("--split", default="test1", help="the CIRR split the file answers")
    parser.add_argument("--version", default="rc2", help="CIRR annotation version of the file and the captions")
    parser.add_argument("--metric", choices=["recall", "recall_subset"], help="expected metric (default: the file's)")


def run(args) -> int:
    from offset_cir.commands.eval import cli_names
    from offset_cir.data import get_dataset

    root = args.root or args.annotations
    failed = 0
    with cli_names():  # library messages in the flags' names (--root, --annotations)
        bench = get_dataset("cirr", root, version=args.version,
                            **({"annotations": args.annotations} if args.annotations else {}))
        for f in args.file:
            failed += _check_one(f, bench, args)
    return 1 if failed else 0


def _check_one(f: str, bench, args) -> int:
    """Print ``OK`` or the file's problems; 1 when it failed, else 0."""
    from offset_cir.eval.cirr_submission import validate_submission

    problems = validate_submission(Path(f), bench, args.split, version=args.version, metric=args.metric)
    if not problems:
        print(f"{f}: OK")
        return 0
    print(f"{f}: FAILED")
    for line in problems:
        print(f"  {line}")
    return 1
