"""Print (or write into docs/architecture.md) the table of the package's modules: path, lines, first docstring line.

    python docs/modules.py            # the table, to standard output
    python docs/modules.py --write    # replace the table between the markers in docs/architecture.md

The counts are ``len(file.splitlines())``; the job of each module is the first line of its docstring (one job per
module, named there). tests/test_structure.py checks that the written table lists every module with its job.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "offset_cir"
DOC = ROOT / "docs" / "architecture.md"
START, END = "<!-- modules: start (python docs/modules.py --write) -->", "<!-- modules: end -->"


def first_line(path: Path) -> str:
    """The first line of a module's docstring ('' when it has none)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


def rows() -> list[tuple[str, int, str]]:
    """(path relative to offset_cir/, lines, job) of every module, in package order."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py"), key=lambda p: (p.parent.relative_to(PACKAGE).parts, p.name)):
        rel = path.relative_to(PACKAGE).as_posix()
        out.append((rel, len(path.read_text(encoding="utf-8").splitlines()), first_line(path)))
    return out


def table() -> str:
    lines = ["| module | lines | its one job (first docstring line) |", "| --- | ---: | --- |"]
    for rel, n, job in rows():
        lines.append(f"| `{rel}` | {n} | {job.replace('|', '&#124;')} |")
    total = sum(n for _, n, _ in rows())
    lines.append(f"| **{len(rows())} modules** | **{total}** | |")
    return "\n".join(lines)


def write() -> None:
    text = DOC.read_text(encoding="utf-8")
    if START not in text or END not in text:
        sys.exit(f"{DOC}: the markers {START!r} and {END!r} are missing")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{table()}\n{END}{tail}", encoding="utf-8")
    print(f"wrote the table of {len(rows())} modules into {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in docs/architecture.md")
    if parser.parse_args().write:
        write()
    else:
        print(table())
