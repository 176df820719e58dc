"""torchrun support: process-group set-up, rank helpers and a feature gather that keeps gradients."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)  # one GPU per process, before any CUDA context exists
    if not dist.is_initialized():
        # Rank 0 evaluates alone while the others wait in a collective: allow long evaluations.
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=3))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def any_rank(flag: bool, info: DistInfo, device) -> bool:
    """True when the flag is set on any rank (so every rank takes the same branch)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows concatenated (gradients flow back to each rank's own rows) and this rank's offset.

    Each rank's loss then spans the global batch; DistributedDataParallel's gradient averaging makes the
    update equal to a single process's on the global batch (the gather's backward sums over ranks).
    """
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
