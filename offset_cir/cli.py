"""The ``offset`` command line: a thin dispatcher over ``offset_cir.commands``.

Each sub-command lives in its own module under ``offset_cir/commands`` and exposes ``NAME`` (the command's
name), ``HELP`` (its one-line help), ``add_arguments(parser)`` and ``run(args) -> int``; the module is the one
place these are written. This file only lists the modules, in the order ``offset --help`` shows them. A
command module imports nothing heavy at its top (the standard library, ``errors``; its work imports inside
``run``), so reading every ``NAME``/``HELP`` keeps ``offset --help`` fast; only the command being run has its
``add_arguments`` and ``run`` called, so a command whose optional extra is not installed does not break the others.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

# the modules under offset_cir.commands, in the order of `offset --help`
COMMAND_MODULES: tuple[str, ...] = (
    "demo", "synth", "train", "eval", "submit", "validate_submission", "doctor", "masks", "index", "search",
    "serve", "export", "info",
)


def _load(module: str):
    return importlib.import_module(f"offset_cir.commands.{module}")


def _table() -> list[tuple[str, str, str]]:
    """(command name, module, one-line help) of every command, read from the modules themselves."""
    table = []
    for module in COMMAND_MODULES:
        mod = _load(module)
        table.append((mod.NAME, module, mod.HELP))
    return table


# (command name, module under offset_cir.commands, one-line help)
COMMANDS: list[tuple[str, str, str]] = _table()


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
        # Only the command being run adds its arguments (and imports what they need).
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
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"error: the disk is full{where} ({exc.strerror}). Files already written are whole (every write goes "
              f"through a temporary file); free some space or write elsewhere (--out / out_dir=...), then run the "
              f"command again.", file=sys.stderr)
        return 1


from offset_cir.errors import OffsetError  # noqa: E402  (tiny module, no I/O)

if __name__ == "__main__":
    sys.exit(main())
