"""``offset validate-submission FILE``: check a CIRR or CIRCO test-server file offline (docs/model.md#evaluation)."""
from __future__ import annotations

import argparse
from pathlib import Path

NAME = "validate-submission"
HELP = "check a CIRR or CIRCO test-server file offline"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="+", help="submission JSON file(s)")
    parser.add_argument("--dataset", choices=["cirr", "circo"], default="cirr",
                        help="whose test server the file is for (default: cirr)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--root", help="the benchmark's folder (CIRR: holding cirr/captions and cirr/image_splits, or "
                                      "captions/ directly; CIRCO: holding annotations/)")
    where.add_argument("--annotations", help="folder holding the annotation files (CIRR: captions/ and "
                                             "image_splits/; CIRCO: val.json and test.json)")
    parser.add_argument("--split", help="the split the file answers (default: cirr test1, circo test)")
    parser.add_argument("--version", default="rc2", help="cirr: annotation version of the file and the captions")
    parser.add_argument("--metric", choices=["recall", "recall_subset"],
                        help="cirr: expected metric (default: the file's)")


def run(args) -> int:
    from offset_cir.commands.eval import cli_names
    from offset_cir.data import get_dataset

    root = args.root or args.annotations
    settings = {"annotations": args.annotations} if args.annotations else {}
    if args.dataset == "cirr":
        settings["version"] = args.version
    failed = 0
    with cli_names():  # library messages in the flags' names (--root, --annotations)
        bench = get_dataset(args.dataset, root, **settings)
        for f in args.file:
            failed += _check_one(f, bench, args)
    return 1 if failed else 0


def _check_one(f: str, bench, args) -> int:
    """Print ``OK`` or the file's problems; 1 when it failed, else 0."""
    if args.dataset == "circo":
        from offset_cir.eval.circo_submission import validate_submission

        problems = validate_submission(Path(f), bench, args.split or "test")
    else:
        from offset_cir.eval.cirr_submission import validate_submission

        problems = validate_submission(Path(f), bench, args.split or "test1", version=args.version,
                                       metric=args.metric)
    if not problems:
        print(f"{f}: OK")
        return 0
    print(f"{f}: FAILED")
    for line in problems:
        print(f"  {line}")
    return 1
