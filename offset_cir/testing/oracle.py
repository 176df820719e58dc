"""Test doubles that follow the model interface (architecture: model contract), for checking the data and
evaluation path without a trained model: they read the code spelled by a placeholder image
(:mod:`offset_cir.testing.placeholders`).

- :class:`OracleModel` (``sign=+1``): the query feature is the target's one-hot code, so the target is always
  the nearest (every recall is 100); ``sign=-1`` (reversed) makes the target the farthest; ``signs`` sets
  it per query.
- :class:`HashModel`: a fixed random feature per code (D wide) for timing the ranking path.

The query side takes the targets in evaluation order (a cursor over ``targets``): evaluation encodes the
queries in file order, unit after unit, so build a fresh oracle (or call :meth:`reset`) per evaluation.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from offset_cir.config_base import Config
from offset_cir.testing.placeholders import CodePreprocess, decode


@dataclass
class FakeConfig(Config):
    backbone: str = "oracle"
    sign: float = 1.0


class _CodeModel(torch.nn.Module):
    def __init__(self, uses_masks: bool = True):
        super().__init__()
        self.uses_masks = uses_masks
        self.preprocess = CodePreprocess()
        self._anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)  # gives the model a device

    def _codes(self, images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        codes = decode(images)
        if self.uses_masks:
            if masks is None or masks.shape != images.shape:
                raise AssertionError(f"model needs masks, got {None if masks is None else tuple(masks.shape)}")
            if not torch.equal(decode(masks), codes):
                raise AssertionError("a mask does not belong to its image")
        return codes


class OracleModel(_CodeModel):
    """Perfect (``sign=1``) or reversed (``sign=-1``) oracle over ``dim`` codes; ``targets``: target code per
    query in evaluation order."""

    def __init__(self, targets: list[int], dim: int, sign: float = 1.0, uses_masks: bool = True,
                 signs: list[float] | None = None, random_dim: int | None = None):
        super().__init__(uses_masks)
        # random_dim: random unit features instead of one-hot codes (same ranking of the target, no ties among
        # the others, much cheaper for large galleries)
        self.table = None
        if random_dim:
            g = torch.Generator().manual_seed(0)
            self.table = F.normalize(torch.randn(int(dim), int(random_dim), generator=g), dim=-1)
        self.targets, self.dim, self.sign = list(targets), int(dim), float(sign)
        self.signs = [self.sign] * len(self.targets) if signs is None else [float(x) for x in signs]
        if len(self.signs) != len(self.targets):
            raise ValueError("one sign per target expected")
        self.config = FakeConfig("oracle", self.sign)
        self.cursor = 0
        self.references: list[int] = []

    def reset(self) -> None:
        self.cursor, self.references = 0, []

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return self.table.to(codes.device)[codes]
        return F.one_hot(codes, self.dim).float()

    def encode_target(self, images, masks=None):
        return self._embed(self._codes(images, masks))

    def encode_query(self, images, masks, texts):
        if len(texts) != images.shape[0]:
            raise AssertionError("one text per reference image expected")
        self.references.extend(self._codes(images, masks).tolist())
        sl = slice(self.cursor, self.cursor + len(texts))
        self.cursor += len(texts)
        if len(self.targets[sl]) != len(texts):
            raise AssertionError("more queries encoded than targets given (reset the oracle per evaluation)")
        hot = self._embed(torch.as_tensor(self.targets[sl], device=images.device))
        return torch.as_tensor(self.signs[sl], device=images.device)[:, None] * hot


class HashModel(_CodeModel):
    """A fixed random unit feature per code; the query feature mixes the reference's feature and a text hash."""

    def __init__(self, dim: int = 512, max_code: int = 1 << 16, uses_masks: bool = True, seed: int = 0):
        super().__init__(uses_masks)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", F.normalize(torch.randn(max_code + 1, dim, generator=g), dim=-1))
        self.config = FakeConfig("hash")

    def encode_target(self, images, masks=None):
        return self.table[self._codes(images, masks)]

    def encode_query(self, images, masks, texts):
        ref = self.table[self._codes(images, masks)]
        idx = torch.as_tensor([zlib.crc32(t.encode()) % self.table.shape[0] for t in texts], device=ref.device)
        return F.normalize(ref + self.table[idx], dim=-1)
