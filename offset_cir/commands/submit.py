"""``offset submit cirr``: write the two CIRR test-server files (SPEC section 7) and check them offline."""
from __future__ import annotations

import argparse

from offset_cir.commands.eval import add_dataset_arguments, cli_names, dataset_settings
from offset_cir.errors import UserInputError

NAME = "submit"
HELP = "write the CIRR test-server files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=["cirr"], help="only cirr has a test server")
    add_dataset_arguments(parser, dataset_flag=False)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder saved by offset train (e.g. RUN/best), its model.safetensors, or "
                             "hf-hub:ORG/NAME from the Hugging Face hub")
    parser.add_argument("--out", required=True, help="folder for the two JSON files")
    parser.add_argument("--split", default="test1", help="the CIRR split the test server scores")
    parser.add_argument("--batch-size", type=int, default=32, help="queries and gallery images per forward pass")
    parser.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def run(args) -> int:
    with cli_names():
        return _run(args)


def _run(args) -> int:
    import offset_cir
    from offset_cir.data import get_dataset
    from offset_cir.device import choose_device
    from offset_cir.eval.cirr_submission import predict_test, validate_submission, write_submission

    bench = get_dataset(args.benchmark, args.root, **dataset_settings(args))
    split = bench.canonical_split(args.split)
    device = choose_device(args.device, what="--device")
    model = offset_cir.load_checkpoint(args.checkpoint).to(device)
    if not model.uses_masks:
        bench.use_masks = False
    preds = predict_test(model, bench, split, batch_size=args.batch_size, num_workers=args.num_workers, device=device)
    paths = write_submission(preds, args.out, split=split, version=bench.version)
    bad = 0
    for metric, path in paths.items():
        problems = validate_submission(path, bench, split, version=bench.version, metric=metric)
        print(f"{path}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        for line in problems:
            print(f"  {line}")
        bad += bool(problems)
    if bad:
        raise UserInputError("the written files do not pass the offline check (see above)")
    return 0
