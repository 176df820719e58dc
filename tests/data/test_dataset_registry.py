"""The table of benchmarks (offset_cir.data.registry) and what the data floor may not know."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import offset_cir
from offset_cir.data import dataset_class, get_dataset, list_datasets, register_dataset
from offset_cir.data.common import Benchmark
from offset_cir.errors import DatasetError

PACKAGE = Path(offset_cir.__file__).parent


def test_the_packages_benchmarks_are_listed_and_found_by_any_spelling(tmp_path):
    assert list_datasets() == ["fashioniq", "shoes", "cirr", "fashion200k", "circo", "synthetic"]
    assert dataset_class("Fashion-IQ").name == "fashioniq" and dataset_class("fashion_200k").name == "fashion200k"
    assert dataset_class("synthetic").__module__ == "offset_cir.data.synthetic.benchmark"
    with pytest.raises(DatasetError, match="unknown dataset 'nope'; choose from fashioniq, shoes, cirr"):
        get_dataset("nope", tmp_path)
    with pytest.raises(DatasetError, match="circo: bad setting"):
        get_dataset("circo", tmp_path, colour="red")


def test_register_a_loader_with_the_decorator(tmp_path, monkeypatch):
    from offset_cir.data import registry

    monkeypatch.setattr(registry, "DATASETS", dict(registry.DATASETS))  # this test's additions go with it

    @register_dataset("my-bench")
    class MyBench(Benchmark):
        name = "mybench"

    assert list_datasets()[-1] == "my-bench"
    assert isinstance(get_dataset("MY_BENCH", tmp_path), MyBench)
    register_dataset("mybench", MyBench)  # the same loader again: allowed
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("cirr", MyBench)


def test_listing_the_datasets_imports_no_loader():
    code = ("import sys; from offset_cir.data import list_datasets; list_datasets(); "
            "print(sorted(m for m in sys.modules if m.startswith('offset_cir.data.') or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "['offset_cir.data.registry']", out.stdout + out.stderr


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_the_data_floor_knows_nothing_above_it():
    for path in (PACKAGE / "data").rglob("*.py"):
        upper = {m for m in _imports(path) if m.split(".")[:2] in (["offset_cir", "eval"], ["offset_cir", "train"])}
        assert not upper, f"{path} imports {upper}"
    # CIRR's loader does not know the synthetic benchmark's metadata file: the synthetic loader owns it
    assert not [m for m in _imports(PACKAGE / "data" / "cirr.py") if "synthetic" in m]
    assert "synthetic_meta" not in (PACKAGE / "data" / "cirr.py").read_text(encoding="utf-8")
