"""Training precision: what ``precision`` means on a device, and the autocast context it trains under."""
from __future__ import annotations

import contextlib

import torch

from offset_cir.errors import UserInputError

__all__ = ["training_precision", "autocast"]


def training_precision(setting: str, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for the config's ``precision`` on ``device``: ``auto`` is the release's fp16
    autocast (with a grad scaler) on CUDA and fp32 elsewhere; fp16 needs CUDA."""
    if setting == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if setting == "fp16" and device.type != "cuda":
        raise UserInputError("precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if setting not in ("fp32", "bf16", "fp16"):
        raise UserInputError(f"precision={setting!r}: expected auto, fp32, bf16 or fp16")
    return setting


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device`` (none for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
