"""The ``offset`` command line: a thin dispatcher over ``offset_cir.commands``.

Each sub-command lives in its own module under ``offset_cir/commands`` and exposes
``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.  Modules are
imported only when their command runs, so ``offset --help`` stays fast and a command
whose optional extra is not installed does not break the others.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (command name, module under offset_cir.commands, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "demo", "synthetic benchmark end to end: train OFFSET and two comparisons, evaluate, report"),
    ("synth", "synth", "generate the synthetic cluttered-scene benchmark (CIRR layout)"),
    ("train", "train", "train a model from a YAML preset or file, with key=value overrides"),
    ("eval", "eval", "evaluate a checkpoint on a benchmark protocol"),
    ("submit", "submit", "write the CIRR test-server files"),
    ("validate-submission", "validate_submission", "check a CIRR test-server file offline"),
    ("doctor", "doctor", "check a dataset folder: counts, missing files, manifest"),
    ("masks", "masks", "dominant-portion masks for a benchmark or an image folder"),
    ("index", "index", "encode a folder of images into a search index"),
    ("search", "search", "query a search index with an image and a text"),
    ("serve", "serve", "REST service and web page over a search index"),
    ("export", "export", "export a checkpoint to ONNX (query and target graphs, optional int8)"),
    ("info", "info", "versions, registered backbones and presets"),
]


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help when X says something: not for None, an empty list, the
    False of an on/off flag, or a help text that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is argparse.SUPPRESS or default == []
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
                or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def _load(module: str):
    return importlib.import_module(f"offset_cir.commands.{module}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offset", description="OFFSET composed image retrieval toolkit",
                                     formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        # Only the command being run imports its module (and its heavy dependencies).
        if name == wanted:
            mod = _load(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OffsetError as exc:  # bad input or a stop: a clear message, non-zero exit, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


from offset_cir.errors import OffsetError  # noqa: E402  (tiny module, no I/O)

if __name__ == "__main__":
    sys.exit(main())
