"""Device choice: which torch device a command, the trainer or the index builder runs on.

One rule everywhere: ``None``, ``""`` or ``"auto"`` means this process's GPU when CUDA is available (under torchrun
the GPU of its ``LOCAL_RANK``), else the CPU; a bare ``"cuda"`` also means this process's own GPU; asking for
CUDA on a machine without it is a ``UserInputError`` that names the request.
"""
from __future__ import annotations

import os

import torch

from offset_cir.errors import UserInputError

__all__ = ["choose_device", "device_of"]


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def choose_device(requested: str | torch.device | None = "auto", *, what: str = "device") -> torch.device:
    """The torch device for ``requested`` (see the module docstring); ``what`` names the option in errors."""
    if requested is None or (isinstance(requested, str) and requested.strip() in ("", "auto")):
        return torch.device("cuda", _local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as e:
        raise UserInputError(f"{what} {requested!r}: not a torch device (expected auto, cpu, cuda or cuda:N)") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"{what} {requested!r}: CUDA is not available on this machine (use cpu)")
        if device.index is None:
            return torch.device("cuda", _local_rank())
    return device


def device_of(module: torch.nn.Module | None, default: str | torch.device = "cpu") -> torch.device:
    """The device of a module's first parameter (``default`` for a module without parameters)."""
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device(default)
