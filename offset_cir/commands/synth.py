"""``offset synth``: write the synthetic cluttered-scene benchmark in the CIRR layout (see
``offset_cir.data.synthetic`` and docs/synthetic.md)."""
from __future__ import annotations

import argparse

NAME = "synth"
HELP = "generate the synthetic cluttered-scene benchmark (CIRR layout)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from offset_cir.data.synthetic import DEFAULTS

    parser.add_argument("--out", required=True, help="output folder (created; see --overwrite)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="everything follows from it (default 0)")
    parser.add_argument("--image-size", type=int, default=DEFAULTS["image_size"], help="image side in pixels (default 64)")
    parser.add_argument("--train", type=int, default=DEFAULTS["n_train"], help="train queries (default %(default)s)")
    parser.add_argument("--val", type=int, default=DEFAULTS["n_val"], help="val queries (default %(default)s)")
    parser.add_argument("--test", type=int, default=DEFAULTS["n_test"], help="test queries (default %(default)s)")
    parser.add_argument("--mask-noise", type=float, default=DEFAULTS["mask_noise"],
                        help="degrade masks like an imperfect segmenter, 0 (exact) to 1 (default 0)")
    parser.add_argument("--unseen-fraction", type=float, default=DEFAULTS["unseen_fraction"],
                        help="fraction of val/test queries whose target is a held-out (shape, colour) pair "
                             "(default %(default)s)")
    parser.add_argument("--train-queries-per-set", type=int, choices=[1, 2, 3],
                        default=DEFAULTS["train_queries_per_set"],
                        help="train queries sharing one set of 6 images (default %(default)s; fewer images to render)")
    parser.add_argument("--workers", type=int, default=None, help="rendering processes (default: up to 2)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a benchmark made with other settings, or write into a non-empty folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from offset_cir.data.synthetic import generate
    from offset_cir.errors import UserInputError

    if args.workers is not None and args.workers < 1:
        raise UserInputError(f"--workers: expected a positive number of processes, got {args.workers}")
    summary = generate(
        args.out, seed=args.seed, image_size=args.image_size, n_train=args.train, n_val=args.val,
        n_test=args.test, mask_noise=args.mask_noise, unseen_fraction=args.unseen_fraction,
        train_queries_per_set=args.train_queries_per_set, overwrite=args.overwrite, workers=args.workers,
        progress=not args.no_progress,
    )
    state = "up to date (nothing written)" if summary["reused"] else f"written in {summary['seconds']:.1f} s"
    print(f"synthetic benchmark {summary['root']}: {state}")
    print(f"  seed {summary['seed']}, {summary['image_size']} px, mask noise {summary['mask_noise']}, "
          f"generator v{summary['generator_version']}")
    print(f"  {'split':<6} {'queries':>8} {'images':>8} {'sets':>6} {'unseen':>7}")
    for split, c in summary["splits"].items():
        print(f"  {split:<6} {c['queries']:>8} {c['images']:>8} {c['sets']:>6} {c['unseen_queries']:>7}")
    pairs = ", ".join(f"{s}/{c}" for s, c in summary["heldout_pairs"])
    print(f"  held-out (shape/colour) pairs, never dominant in train: {pairs}")
    return 0
