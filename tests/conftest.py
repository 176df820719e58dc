"""Shared test set-up: offline hubs, a fixed seed, and the path of the real annotation files."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real annotation files not found at {SHARED_DATA} (the project's ../shared/data)")
    return SHARED_DATA


@pytest.fixture
def circo_copy(shared_data, tmp_path):
    """A CIRCO folder: the real annotation files and an 8x8 placeholder image (and mask) for every reference and
    ground truth of val and test, at the release's paths. Returns ``(root, id -> placeholder code)``."""
    import shutil

    from offset_cir.data import get_dataset
    from offset_cir.testing.placeholders import write_benchmark_placeholders

    root = tmp_path / "CIRCO"
    shutil.copytree(shared_data / "circo" / "annotations", root / "annotations")
    bench = get_dataset("circo", root)
    ids = [i for s in ("val", "test") for q in bench.queries(s) for i in (q.reference, *q.ground_truths)]
    return root, write_benchmark_placeholders(bench, "val", ids=dict.fromkeys(ids))
