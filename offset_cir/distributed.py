"""torchrun support shared by training and index building: process-group set-up and close, rank agreement, gather.

One process (``WORLD_SIZE`` unset or 1) needs no process group: every helper then acts on this process alone, so
callers write one code path. Under ``torchrun`` :func:`init_distributed` joins (or creates) the group; a group this
process created is destroyed by :func:`close_distributed`, one that was already there is left to its owner.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "close_distributed", "any_rank", "all_ok", "gather_with_grad",
           "barrier"]

#: rank 0 evaluates (or merges an index) alone while the others wait in a collective: allow long waits
DEFAULT_TIMEOUT = datetime.timedelta(hours=3)


@dataclass
class DistInfo:
    """This process's place in the group; ``owned`` says that :func:`init_distributed` created the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False
    joined: bool = False  # a process group is in use (also for a group of one, when asked for explicitly)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_type: str, *, enabled: bool | None = None,
                     timeout: datetime.timedelta | None = DEFAULT_TIMEOUT) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE > 1``); gloo on CPU, nccl on CUDA.

    ``enabled`` True/False forces the choice (None: by ``WORLD_SIZE``). ``timeout`` None keeps torch's default.
    A group that already exists is joined, not created (and not destroyed by :func:`close_distributed`).
    """
    if enabled is None:
        enabled = _world_from_env() > 1
    if not enabled:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)  # one GPU per process, before any CUDA context exists
    owned = False
    if not dist.is_initialized():
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", **kwargs)
        owned = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owned=owned, joined=True)


def close_distributed(info: DistInfo) -> None:
    """Destroy the process group when :func:`init_distributed` created it (a no-op otherwise)."""
    if info.owned and dist.is_initialized():
        dist.destroy_process_group()
        info.owned = False


def _collective_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    # nccl reduces CUDA tensors only; gloo reduces CPU tensors
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool, info: DistInfo, device=None) -> bool:
    """True when the flag is set on any rank (so every rank takes the same branch).

    ``device`` holds the reduced tensor (None: CUDA under nccl, else the CPU)."""
    if not (info.enabled or info.joined):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_ok(ok: bool, info: DistInfo, device=None) -> bool:
    """True when every rank says ok (so one failing rank does not leave the others waiting forever)."""
    return not any_rank(not ok, info, device)


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows concatenated (gradients flow back to each rank's own rows) and this rank's offset.

    Each rank's loss then spans the global batch; DistributedDataParallel's gradient averaging makes the
    update equal to a single process's on the global batch (the gather's backward sums over ranks).
    """
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op in one process)."""
    if info.enabled or info.joined:
        dist.barrier()
