"""The test doubles live in one package, ``offset_cir.testing``, and the one rule that seeds an
item's augmentation serves training and evaluation alike (``ItemSeededDataset``)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import offset_cir
from offset_cir.data.common import ItemSeededDataset


def test_the_test_doubles_are_in_offset_cir_testing_and_nowhere_else():
    for elsewhere in ("offset_cir.eval.oracle", "offset_cir.data.placeholders", "offset_cir.masks.testing"):
        assert importlib.util.find_spec(elsewhere) is None, f"{elsewhere}: test doubles live in offset_cir.testing"
    from offset_cir.testing.masks import build_tiny_blip, build_tiny_blip2, build_tiny_clipseg  # noqa: F401
    from offset_cir.testing.oracle import HashModel, OracleModel
    from offset_cir.testing.placeholders import CodePreprocess, placeholder_image

    codes = [1, 2**31 + 5, 77]
    pre = CodePreprocess()
    images = torch.stack([pre.image(placeholder_image(c)) for c in codes])
    oracle = OracleModel(targets=[2, 0, 1], dim=len(codes), uses_masks=False)
    sims = oracle.encode_query(images, None, ["a", "b", "c"]) @ torch.eye(3)[[2, 0, 1]].T
    assert torch.equal(sims.argmax(1), torch.arange(3))
    assert oracle.references == codes  # the codes the placeholders spell, read back from their pixels
    assert HashModel(dim=8, max_code=1 << 8, uses_masks=False).config.backbone == "hash"


def test_importing_the_package_loads_no_double_and_the_library_imports_none():
    code = ("import sys, offset_cir.testing; "
            "print(sorted(m for m in sys.modules if m.startswith('offset_cir.testing.') or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    package = Path(offset_cir.__file__).parent
    users = [str(p.relative_to(package)) for p in package.rglob("*.py")
             if "testing" not in p.relative_to(package).parts and "offset_cir.testing" in p.read_text(encoding="utf-8")]
    assert users == []  # library code never depends on a test double


class _Draws(Dataset):
    """Item ``i`` is three draws from torch's RNG: stands in for a random crop."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> torch.Tensor:
        assert isinstance(i, int)
        return torch.rand(3)


def _draws_after_seeding(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, generator=g)


def test_training_and_evaluation_seed_items_by_one_rule():
    ds = ItemSeededDataset(_Draws(), seed=5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    train_item = ds[(2, 7)]  # training: (epoch, index) as its sampler yields them
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG state is untouched
    torch.manual_seed(999)
    assert torch.equal(ds[(2, 7)], train_item)  # ... and does not matter
    assert not torch.equal(ds[(3, 7)], train_item) and not torch.equal(ds[(2, 8)], train_item)
    # the item seed is this fixed mix of (seed, epoch, index): a resumed run depends on it
    assert torch.equal(train_item, _draws_after_seeding((5 * 1_000_003 + 2 * 10_007 + 7) % 2**63))
    # evaluation: item i of the unit named by salt, the same rule with the name's code as the unit
    named = ItemSeededDataset(_Draws(), seed=5, salt="dress")
    assert torch.equal(named[7], ds[(zlib.crc32(b"dress"), 7)])
    assert torch.equal(named[7], _draws_after_seeding((5 * 1_000_003 + zlib.crc32(b"dress") * 10_007 + 7) % 2**63))


@pytest.mark.parametrize("workers", [0, 2])
def test_training_draws_do_not_depend_on_the_workers(workers):
    from offset_cir.train.sampling import EpochSampler

    ds = ItemSeededDataset(_Draws(), seed=1)
    sampler = EpochSampler(len(ds), seed=1, global_batch=2)
    sampler.set_epoch(3)
    got = torch.cat(list(DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers)))
    want = torch.stack([ds[key] for key in sampler])
    assert torch.equal(got, want)
