"""``offset submit cirr|circo``: write a benchmark's test-server files (docs/model.md#evaluation) and check them offline."""
from __future__ import annotations

import argparse

from offset_cir.commands.eval import add_dataset_arguments, cli_names, dataset_settings
from offset_cir.errors import UserInputError

NAME = "submit"
HELP = "write the CIRR or CIRCO test-server files"
DEFAULT_SPLIT = {"cirr": "test1", "circo": "test"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=sorted(DEFAULT_SPLIT), help="the benchmark whose test server scores it")
    add_dataset_arguments(parser, dataset_flag=False)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder saved by offset train (e.g. RUN/best), its model.safetensors, or "
                             "hf-hub:ORG/NAME from the Hugging Face hub")
    parser.add_argument("--out", required=True, help="folder for the JSON file(s)")
    parser.add_argument("--split", help="the split the test server scores (default: cirr test1, circo test)")
    parser.add_argument("--batch-size", type=int, default=32, help="queries and gallery images per forward pass")
    parser.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--gallery-cache", metavar="DIR",
                        help="circo: gallery features of this checkpoint kept in DIR by `offset eval --gallery-cache` "
                             "(reused, or written for the next run; default: none)")
    parser.add_argument("--exclude-reference", action="store_true",
                        help="circo: leave each query's reference out of its ranking (the benchmark's own "
                             "evaluation keeps it in; default: kept)")


def run(args) -> int:
    with cli_names():
        return _run(args)


def _print_problems(path, problems: list[str]) -> bool:
    print(f"{path}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    for line in problems:
        print(f"  {line}")
    return bool(problems)


def _run(args) -> int:
    import offset_cir
    from offset_cir.data import get_dataset
    from offset_cir.device import choose_device

    bench = get_dataset(args.benchmark, args.root, **dataset_settings(args))
    split = bench.canonical_split(args.split or DEFAULT_SPLIT[args.benchmark])
    device = choose_device(args.device, what="--device")
    model = offset_cir.load_checkpoint(args.checkpoint).to(device)
    if not model.uses_masks:
        bench.use_masks = False
    kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=device)
    if args.benchmark == "circo":
        from offset_cir.eval import circo_submission as circo
        from offset_cir.eval.gallery_cache import GalleryCache
        from offset_cir.model.checkpoint import checkpoint_hash

        cache = GalleryCache(args.gallery_cache, checkpoint_hash(args.checkpoint)) if args.gallery_cache else None
        preds = circo.predict_test(model, bench, split, gallery_cache=cache, exclude_reference=args.exclude_reference,
                                   **kw)
        path = circo.write_submission(preds, args.out, split=split)
        bad = _print_problems(path, circo.validate_submission(path, bench, split, check_gallery=True))
    else:
        from offset_cir.eval.cirr_submission import predict_test, validate_submission, write_submission

        paths = write_submission(predict_test(model, bench, split, **kw), args.out, split=split, version=bench.version)
        bad = False
        for metric, path in paths.items():
            bad |= _print_problems(path, validate_submission(path, bench, split, version=bench.version, metric=metric))
    if bad:
        raise UserInputError("the written files do not pass the offline check (see above)")
    return 0
