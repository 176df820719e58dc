"""``offset doctor DATASET --root DIR``: counts, missing files, unreadable images and masks, mask sizes as training
checks them, manifest (docs/model.md#data)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from offset_cir.commands.eval import add_dataset_arguments, cli_names, cli_wording, dataset_settings
from offset_cir.errors import UserInputError

NAME = "doctor"
HELP = "check a dataset folder: counts, missing files, manifest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="a dataset name (`offset info` lists them)")
    add_dataset_arguments(parser, dataset_flag=False)
    parser.add_argument("--split", action="append", help="check only this split (repeatable; default: every split)")
    parser.add_argument("--manifest", help="manifest file to write (default: beside the dataset folder, "
                                           "<folder>-manifest.json)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a manifest file that describes other files (refused otherwise)")
    parser.add_argument("--compare", help="a manifest from another copy: list files that differ")
    parser.add_argument("--no-masks", action="store_true", help="masks are not required (models without masks)")
    parser.add_argument("--no-open", action="store_true", help="skip opening every image")
    parser.add_argument("--no-hash", action="store_true", help="manifest without sha256 (faster)")


def run(args) -> int:
    with cli_names():
        return _run(args)


def _run(args) -> int:
    from offset_cir.data import get_dataset
    from offset_cir.data.doctor import SHOW, check, compare_manifests, default_manifest_path, save_manifest
    from offset_cir.eval.protocols import protocol_splits

    settings = dataset_settings(args)
    if args.no_masks:
        settings["use_masks"] = False
    bench = get_dataset(args.dataset, args.root, **settings)
    report = check(bench, args.split, open_images=not args.no_open, hashes=not args.no_hash,
                   protocols=protocol_splits(bench))
    for line in report.lines():
        print(cli_wording(line))
    differs = False
    if args.compare:
        other = Path(args.compare)
        try:
            theirs = json.loads(other.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserInputError(f"cannot read manifest {other}: {exc}") from None
        diff = compare_manifests(report.manifest, theirs)
        for key, names in diff.items():
            if names:
                differs = True
                more = f" ... ({len(names)} in all)" if len(names) > SHOW else ""
                print(f"  {key}: {', '.join(names[:SHOW])}{more}")
        print("copies match" if not differs else f"copies differ from {other}")
    path = args.manifest or default_manifest_path(bench)  # last: a refusal to replace it loses nothing printed
    done = save_manifest(report.manifest, path, overwrite=args.overwrite)
    print(f"manifest: {path} ({len(report.manifest.get('files', []))} files, {report.manifest.get('hash')}; "
          f"{'the same files as before' if done == 'unchanged' else 'written'}; `offset eval --manifest {path}` "
          "records it with the result)")
    return 0 if report.ok and not differs else 1
