"""One name, one meaning: read the package's source, not its behaviour.

- ``recall_at_k`` (the paper's R@k of :mod:`offset_cir.eval.metrics`), ``format_table`` (the demo's comparison
  table), ``recalls`` (the recall keys of a result) are each defined once, and no second definition
  (``_check_masks``, ``_metrics_of``: a second writing of ``recalls``) exists;
- "this uses masks" has one vocabulary: ``use_masks`` (a setting: ModelConfig, a benchmark copy, a Dataset),
  ``uses_masks`` / ``uses_query_mask`` / ``uses_target_mask`` (what a model or encoder does). Other spellings
  (``OTHER_MASK_WORDS``) are no identifier anywhere (JSON keys that older files hold keep their spelling: strings
  are not identifiers).
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "offset_cir"
OTHER_MASK_WORDS = {"needs_masks", "query_needs_mask", "target_needs_mask", "load_masks"}


def _trees(*folders: Path):
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _definitions() -> dict[str, list[str]]:
    found = defaultdict(list)
    for path, tree in _trees(PACKAGE):
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found[node.name].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


@pytest.mark.parametrize("name, count", [("recall_at_k", 1), ("format_table", 1), ("recalls", 1),
                                         ("_check_masks", 0), ("_metrics_of", 0)])
def test_each_name_is_defined_once(name, count):
    assert len(_definitions()[name]) == count, _definitions()[name]


def _identifiers(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.id, node.lineno
        elif isinstance(node, ast.Attribute):
            yield node.attr, node.lineno
        elif isinstance(node, ast.arg):
            yield node.arg, node.lineno
        elif isinstance(node, ast.keyword) and node.arg:
            yield node.arg, node.value.lineno
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name, node.lineno
        elif isinstance(node, ast.alias):
            yield (node.asname or node.name).rsplit(".", 1)[-1], getattr(node, "lineno", 0)


def test_other_mask_words_are_no_identifier():
    used = [f"{path.relative_to(ROOT)}:{line} {name}"
            for path, tree in _trees(PACKAGE, ROOT / "tests", ROOT / "benchmarks")
            for name, line in _identifiers(tree) if name in OTHER_MASK_WORDS]
    assert used == []
