"""The package's layout rules, checked on its source: import contracts, module and function sizes, private names.

The import contracts (no command-line code in the library, the model apart from data/train/eval/search/export,
floors that never import upwards, no circles) are written as import-linter contracts in ``pyproject.toml``;
this test runs them, so ``make test`` fails the moment one breaks.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "offset_cir"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

#: library modules allowed past MAX_MODULE_LINES, each with the reason it stays whole
MODULE_ALLOW: dict[str, str] = {}
#: functions allowed past MAX_FUNCTION_LINES ("module.py:qualname"), each with its reason
FUNCTION_ALLOW: dict[str, str] = {}


def _library_modules() -> list[Path]:
    skip = {"cli.py"}
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if p.name not in skip and "commands" not in p.relative_to(PACKAGE).parts
                  and "testing" not in p.relative_to(PACKAGE).parts)


def _name(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports is not installed: `pip install -e '.[dev]'` installs import-linter")
    proc = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "broken" not in proc.stdout.split("Contracts:")[-1].split("\n")[0].replace("0 broken", "")


def test_library_modules_stay_small():
    too_long = {}
    for path in _library_modules():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_MODULE_LINES and _name(path) not in MODULE_ALLOW:
            too_long[_name(path)] = n
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split them, or allow one with a reason): {too_long}"
    stale = [m for m in MODULE_ALLOW if not (PACKAGE / m).exists()
             or len((PACKAGE / m).read_text(encoding="utf-8").splitlines()) <= MAX_MODULE_LINES]
    assert not stale, f"allow-list entries no longer needed: {stale}"


def _functions(tree: ast.AST):
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
    yield from walk(tree, "")


def test_library_functions_stay_short():
    too_long = {}
    seen = set()
    for path in _library_modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for qualname, node in _functions(tree):
            key = f"{_name(path)}:{qualname}"
            seen.add(key)
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES and key not in FUNCTION_ALLOW:
                too_long[key] = n
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them, or allow one with a reason): {too_long}"
    assert not set(FUNCTION_ALLOW) - seen, f"allow-list entries naming no function: {set(FUNCTION_ALLOW) - seen}"


def test_no_module_imports_a_private_name_of_another():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("offset_cir"):
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private and node.module != here and not node.module.endswith("._lazy"):
                        found.append(f"{_name(path)}: from {node.module} import {alias.name}")
    assert not found, found


def test_the_architecture_doc_lists_every_module_with_its_job():
    """docs/architecture.md's table is written by docs/modules.py: every module is in it, with its job as the
    first line of its docstring says (line counts may lag behind; rerun `python docs/modules.py --write`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("modules_table", ROOT / "docs" / "modules.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    written = {}
    for line in doc.split(table.START, 1)[1].split(table.END, 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            written[cells[0].strip("`")] = cells[2]
    expected = {rel: job.replace("|", "&#124;") for rel, _, job in table.rows()}
    assert set(written) == set(expected), (f"not in the doc: {sorted(set(expected) - set(written))}; "
                                           f"gone: {sorted(set(written) - set(expected))}")
    stale = {rel: (written[rel], job) for rel, job in expected.items() if written[rel] != job}
    assert not stale, f"jobs that changed since the table was written: {stale}"
    assert all(job for rel, job in expected.items() if not rel.endswith("__init__.py")), \
        [rel for rel, job in expected.items() if not job and not rel.endswith("__init__.py")]
