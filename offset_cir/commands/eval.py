"""``offset eval``: evaluate a checkpoint, or a backbone's training-free features, on a benchmark protocol
(docs/model.md#evaluation)."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
from pathlib import Path

from offset_cir.commands._baseline_flags import check_model_flags
from offset_cir.errors import CheckpointError, OffsetError, UserInputError

NAME = "eval"
HELP = "evaluate a checkpoint (or a training-free baseline) on a benchmark protocol"
log = logging.getLogger(__name__)


def add_dataset_arguments(parser: argparse.ArgumentParser, dataset_flag: bool = True) -> None:
    """--dataset/--root and the location settings shared by eval, submit and doctor."""
    if dataset_flag:
        parser.add_argument("--dataset", required=True, help="a dataset name (`offset info` lists them)")
    parser.add_argument("--root", required=True, help="the benchmark's folder (release layout, docs/model.md#data)")
    parser.add_argument("--annotations", help="folder of the annotation files, if not under --root")
    parser.add_argument("--image-root", help="folder of the images, if not the release location")
    parser.add_argument("--mask-root", help="folder of the masks (same relative layout), if not beside the images")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other loader setting, e.g. categories=dress, correction_dicts=DIR (repeatable; "
                             "default: none)")


def dataset_settings(args) -> dict:
    settings = {}
    for key in ("annotations", "image_root", "mask_root"):
        if getattr(args, key, None):
            settings[key] = getattr(args, key)
    from offset_cir.config_base import parse_overrides

    settings.update(parse_overrides(args.set, "--set"))  # values read as YAML, as training's key=value
    return settings


# The loaders' keyword arguments that have a flag of their own; the others are given with --set KEY=VALUE.
FLAG_OF_SETTING = {"root": "--root", "annotations": "--annotations", "image_root": "--image-root",
                   "mask_root": "--mask-root"}
_SETTING_WORD = re.compile(r"(?<![^\s(])(root|annotations|image_root|mask_root|labels|test_queries|correction_dicts|"
                           r"use_masks|categories|version|image_pattern|mask_pattern|mask_suffix|seed|"
                           r"clipseg_maps)=(\S?)")


_UNKNOWN_KEYWORD = re.compile(r"[\w.]*\(\) got an unexpected keyword argument '(\w+)'")


def cli_wording(text: str) -> str:
    """A library message in the command line's names: ``root=`` -> ``--root``, ``labels=`` -> ``--set labels=``."""
    def word(m: re.Match) -> str:
        name, nxt = m.group(1), m.group(2)
        if m.start() > 0 and text[m.start() - 1] == "(" and nxt and nxt not in ").,;":
            return m.group(0)  # ``Call(seed=0)``: Python in a message, not a hint about a setting
        if name in FLAG_OF_SETTING:
            return FLAG_OF_SETTING[name] + (nxt if not nxt or nxt in ").,;" else " " + nxt)
        return f"--set {name}={nxt}"

    text = _UNKNOWN_KEYWORD.sub(lambda m: f"--set {m.group(1)}=... is not a setting of this dataset", text)
    return _SETTING_WORD.sub(word, text)


@contextlib.contextmanager
def cli_names():
    """Re-word the messages of errors raised by the data and evaluation libraries in the flags' names."""
    try:
        yield
    except OffsetError as exc:
        if exc.args and isinstance(exc.args[0], str):
            exc.args = (cli_wording(exc.args[0]), *exc.args[1:])
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from offset_cir.commands._baseline_flags import add_baseline_arguments
    from offset_cir.eval.protocols import list_protocols

    add_dataset_arguments(parser)
    parser.add_argument("--checkpoint",
                        help="checkpoint folder saved by offset train (e.g. RUN/best), its model.safetensors, or "
                             "hf-hub:ORG/NAME from the Hugging Face hub; with --baseline, whose backbone to use")
    add_baseline_arguments(parser, "rank by the backbone's own pretrained features: the reference image's, the "
                                   "text's, or their normalised sum (no new module, no training)")
    parser.add_argument("--protocol", help=f"{', '.join(list_protocols())} (default: the dataset's)")
    parser.add_argument("--gallery-cache", metavar="DIR",
                        help="keep this model's gallery features in DIR and reuse them in later evaluations "
                             "(a large gallery such as CIRCO's is then encoded once per model; default: none)")
    parser.add_argument("--split", help="split to evaluate (default: the protocol's)")
    parser.add_argument("--batch-size", type=int, default=32, help="queries and gallery images per forward pass")
    parser.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--out", help="also write the result JSON here (default: only the checkpoint's results/ "
                                      "folder; runs/eval/<dataset>-<protocol>-<split>.json when not recorded)")
    parser.add_argument("--no-record", action="store_true",
                        help="do not record the result in the checkpoint folder (results/<dataset>-<protocol>-"
                             "<split>.json) nor regenerate its model card README.md")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace result, rankings and sheet files an earlier evaluation wrote (refused otherwise)")
    parser.add_argument("--manifest", metavar="FILE",
                        help="dataset manifest written by `offset doctor --manifest`, recorded with the result "
                             "(default: the one beside the dataset folder when it describes this --root)")
    parser.add_argument("--rankings", help="also write the top-50 gallery ids per query (JSON Lines)")
    parser.add_argument("--sheet", type=int, metavar="N",
                        help="draw N queries (evenly spread) with their top-5 results and the true target to a PNG")
    parser.add_argument("--sheet-out", metavar="FILE",
                        help="where --sheet draws (default: runs/eval/<dataset>-<protocol>-<split>-sheet.png)")
    from offset_cir.commands.serve import add_precision_argument

    add_precision_argument(parser, "fp32")  # results comparable with the paper's unless asked otherwise
    parser.add_argument("--query-transform", choices=["eval", "train"],
                        help="reference-image transform (docs/model.md#a2; default: train for FashionIQ as the release, "
                             "eval elsewhere)")


def _record_folder(args) -> Path | None:
    """The checkpoint folder the result is recorded in, or None (asked not to, a hub checkpoint, read-only)."""
    from offset_cir.model.checkpoint import checkpoint_folder, is_hub_checkpoint

    if args.no_record:
        return None
    if is_hub_checkpoint(args.checkpoint):
        log.info("%s: a hub checkpoint, the result is not recorded in the cache (push it with the folder)",
                 args.checkpoint)
        return None
    try:
        folder = checkpoint_folder(args.checkpoint)
    except CheckpointError:
        return None  # loading it says what is wrong
    if not os.access(folder, os.W_OK):
        log.warning("%s is not writable: the result is not recorded there (--no-record silences this)", folder)
        return None
    return folder


def _changed_files(files: list, root: Path) -> list[str]:
    """Manifest entries whose file is missing or has another size now (a stat per file, no hashing)."""
    changed = []
    for f in files:
        rel = str(f.get("path", "")) if isinstance(f, dict) else ""
        p = Path(rel) if Path(rel).is_absolute() else root / rel
        try:
            if f.get("size") is not None and p.stat().st_size != f["size"]:
                changed.append(rel)
        except OSError:
            changed.append(rel)
    return changed


def read_manifest(path, bench, explicit: bool) -> dict | None:
    """What a result records of the dataset manifest ``offset doctor --manifest`` wrote (None: no usable one)."""
    from offset_cir.data.doctor import manifest_hash

    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if explicit:
            raise UserInputError(f"--manifest {path}: no such file (write one with `offset doctor {bench.name} "
                                 f"--root ... --manifest {path}`)") from None
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"--manifest {path}: not a manifest written by offset doctor ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise UserInputError(f"--manifest {path}: not a manifest written by offset doctor (no \"files\" list)")
    if manifest.get("dataset") != bench.name:
        if not explicit:
            return None
        raise UserInputError(f"--manifest {path} describes dataset {manifest.get('dataset')!r}, not {bench.name}")
    same_root = Path(str(manifest.get("root", ""))).expanduser().resolve() == Path(bench.root).resolve()
    if not same_root:
        if not explicit:
            return None
        log.warning("--manifest %s was made for %s, not --root %s: recorded as given", path, manifest.get("root"),
                    bench.root)
    files = manifest["files"]
    changed = _changed_files(files, Path(bench.root)) if same_root else []
    if changed:
        what = f"{len(changed)} of its {len(files)} files differ from the data now (first: {', '.join(changed[:3])})"
        if not explicit:
            log.warning("%s is not recorded: %s; run `offset doctor %s --root ... --manifest` again", path, what,
                        bench.name)
            return None
        raise UserInputError(f"--manifest {path}: {what}: it no longer describes this copy; write it again with "
                             f"`offset doctor {bench.name} --root {bench.root} --manifest {path}`")
    return {"path": str(path), "hash": manifest_hash(manifest), "created": manifest.get("created"),
            "root": manifest.get("root"), "files": len(files), "sha256": all("sha256" in f for f in files)}


def run(args) -> int:
    with cli_names():
        return _run(args)


def _open_model(args, device) -> tuple[object, str | None, dict]:
    """(model or baseline encoder, the key naming its gallery features, what the result records of it)."""
    import offset_cir
    from offset_cir.commands._baseline_flags import baseline_spec

    record: dict = {}
    ckpt_hash = None
    if args.checkpoint is not None:
        record["checkpoint"] = str(args.checkpoint)
        try:
            from offset_cir.model.checkpoint import checkpoint_hash

            ckpt_hash = record["checkpoint_hash"] = checkpoint_hash(args.checkpoint)
        except CheckpointError:
            pass
    if args.baseline is None:
        return offset_cir.load_checkpoint(args.checkpoint).to(device), ckpt_hash, record
    model = baseline_spec(args).build(checkpoint_key=ckpt_hash)
    return model.to(device), model.target_identity, record


def _outputs(args, bench, proto, split) -> tuple:
    """(checkpoint folder recorded in, recorded result, --out, --rankings, sheet, the outputs' file stem): each path
    None when not written; refused before the (long) evaluation when one exists and --overwrite is not given."""
    from offset_cir.model.card import result_path

    stem = f"{bench.name}-{proto.name}-{split}"
    if args.baseline:
        stem += f"-baseline-{args.baseline.replace('+', '-')}"
    folder = _record_folder(args) if args.baseline is None else None  # a baseline is not the checkpoint's result
    record = result_path(folder, bench.name, proto.name, split) if folder is not None else None
    out = Path(args.out) if args.out else (None if record is not None else Path(f"runs/eval/{stem}.json"))
    rankings = Path(args.rankings) if args.rankings else None
    sheet = Path(args.sheet_out or f"runs/eval/{stem}-sheet.png") if args.sheet else None
    taken = [str(p) for p in (record, out, rankings, sheet) if p is not None and p.exists()]
    if taken and not args.overwrite:
        raise UserInputError(
            "not overwriting what an earlier evaluation wrote: " + ", ".join(taken) + ". Pass --overwrite to "
            "replace it, or write elsewhere (--out, --rankings, --sheet-out; --no-record leaves the checkpoint's "
            "results/ alone)")
    return folder, record, out, rankings, sheet, stem


def _run(args) -> int:
    import tempfile

    from offset_cir import io
    from offset_cir.data import get_dataset
    from offset_cir.data.doctor import default_manifest_path
    from offset_cir.device import choose_device
    from offset_cir.eval import attributes
    from offset_cir.eval.evaluate import evaluate
    from offset_cir.eval.gallery_cache import GalleryCache
    from offset_cir.eval.protocols import protocol_for
    from offset_cir.model.card import default_name, format_result, record_result, write_model_card

    check_model_flags(args)
    if args.sheet is not None and args.sheet < 1:
        raise UserInputError(f"--sheet expects a number of queries >= 1, got {args.sheet}")
    if args.sheet is not None:  # checked before the evaluation, not after it
        from offset_cir.extras import import_extra

        import_extra("matplotlib", "train", "--sheet (a contact sheet of rankings)")
    bench = get_dataset(args.dataset, args.root, **dataset_settings(args))
    proto = protocol_for(args.protocol, bench)  # fail before loading a large checkpoint
    split = bench.canonical_split(args.split or proto.split)
    folder, record, out, rankings, sheet, stem = _outputs(args, bench, proto, split)
    manifest = read_manifest(args.manifest or default_manifest_path(bench), bench, explicit=bool(args.manifest))
    device = choose_device(args.device, what="--device")
    model, key, stamp = _open_model(args, device)
    from offset_cir.export.precision import use_precision

    model, precision = use_precision(model, args.precision)
    if key is not None and precision.precision != "fp32":  # features in another precision are others
        key = f"{key}:{precision.precision}"
    if not model.uses_masks:
        bench.use_masks = False
    cache = None
    if args.gallery_cache:
        if key is None:
            raise UserInputError(f"--gallery-cache: {args.checkpoint} has no content hash to name its features by")
        cache = GalleryCache(args.gallery_cache, key)
    meta = attributes.benchmark_meta(bench)  # synthetic: what the top result has of what the text asks for
    with tempfile.TemporaryDirectory(prefix="offset-eval-") as tmp:
        ranked = rankings or (Path(tmp) / "rankings.jsonl" if sheet is not None or meta is not None else None)
        result = evaluate(model, bench, proto.name, split=split, batch_size=args.batch_size,
                          num_workers=args.num_workers, save_rankings=ranked, device=device,
                          query_transform=args.query_transform, gallery_cache=cache)
        result.update(stamp)
        result["precision"] = precision.to_json()
        if meta is not None:
            result["top1_attributes"] = attributes.rankings_table(ranked, meta, split, result["gallery"][0])
        if manifest is not None:
            result["dataset_manifest"] = manifest
        if rankings is None:
            result.pop("rankings_file", None)
        written = []
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            io.write_json(out, result)
            written.append(f"results: {out}")
        if record is not None:
            try:
                written.append(f"recorded: {record_result(folder, result, overwrite=args.overwrite)}")
            except (OSError, UserInputError) as exc:  # the evaluation is done: keep its result, do not lose it
                rescue = Path(f"runs/eval/{stem}-{result['timestamp'].replace(':', '')}.json")
                rescue.parent.mkdir(parents=True, exist_ok=True)
                io.write_json(rescue, result)
                log.warning("could not record the result in %s (%s); written to %s", folder, exc, rescue)
                written.append(f"results: {rescue}")
            else:
                try:
                    written.append(f"model card: {write_model_card(folder)}")
                except (OSError, UserInputError) as exc:  # e.g. a hand-edited card with broken front matter
                    log.warning("the model card of %s was not regenerated (%s); the result is recorded", folder, exc)
        if rankings is not None:
            written.append(f"rankings: {rankings}")
        if sheet is not None:
            from offset_cir.eval.sheet import draw_retrieval_sheet, read_rankings, spread

            gallery = result["gallery"][0]
            rows = spread(read_rankings(ranked, gallery), args.sheet)
            name = (str(args.checkpoint) if folder is None else default_name(folder)) if args.baseline is None \
                else f"baseline {args.baseline} ({model.config['backbone']})"
            title = (f"{name} on {bench.name} {split} (protocol {proto.name}, gallery "
                     f"{gallery}): reference, text, top-5 and the true target")
            marks = attributes.asked_marks(meta, split) if meta is not None else None
            written.append(f"sheet: {draw_retrieval_sheet(rows, bench.image_path, sheet, k=5, title=title, marks=marks)} "
                           f"({len(rows)} queries)")
    print(format_result(result))
    print()
    if meta is not None:
        print(attributes.format_result_table(result["top1_attributes"], attributes.chance_shares(meta, split)) + "\n")
    for line in written:
        print(line)
    return 0
