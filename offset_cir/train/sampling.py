"""The training data order: which triplet each process reads at each position of each epoch.

The order of an epoch is a permutation of the training split seeded by (seed, epoch) alone, cut to whole global
batches, or, with ``keep_partial``, ending with one smaller batch (as the release's DataLoader does) cut to a
multiple of the process count so that every process gets as many items; under torchrun process ``rank`` of
``world`` takes every ``world``-th item of it. So N processes with batch B read the same triplets per step as one
process with batch N*B, and a resumed run skips exactly what it had read.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler

from offset_cir.errors import UserInputError

__all__ = ["EpochSampler"]


class EpochSampler(Sampler):
    """Yields ``(epoch, index)``: a permutation seeded by (seed, epoch), cut to whole global batches (with
    ``keep_partial``: and the rest, cut to a multiple of ``world``), this rank's share ``perm[rank::world]``,
    starting after ``skip`` items (resume)."""

    def __init__(self, n: int, seed: int, global_batch: int, rank: int = 0, world: int = 1,
                 keep_partial: bool = False):
        if n < (world if keep_partial else global_batch):
            raise UserInputError(f"the training split has {n} triplets, fewer than one global batch ({global_batch})"
                                 if not keep_partial else
                                 f"the training split has {n} triplets, fewer than the {world} processes")
        self.n, self.seed, self.global_batch, self.rank, self.world = n, seed, global_batch, rank, world
        self.keep_partial = bool(keep_partial)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The epoch to yield next, and how many of this rank's items of it to leave out (already read)."""
        self.epoch, self.skip = epoch, skip

    def used(self) -> int:
        """Items of the permutation an epoch reads, all ranks together."""
        if self.keep_partial:
            return self.n // self.world * self.world
        return self.n // self.global_batch * self.global_batch

    def per_rank(self) -> int:
        """Items of one whole epoch on this rank."""
        return self.used() // self.world

    def __len__(self) -> int:
        return max(self.per_rank() - self.skip, 0)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.used()]
        mine = perm[self.rank:: self.world].tolist()
        for i in mine[self.skip:]:
            yield self.epoch, i
