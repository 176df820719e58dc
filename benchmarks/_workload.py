"""Shared workload of the model benchmarks: a model on random inputs and its train step under a precision."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from offset_cir import ModelConfig, build_model


@dataclass
class Workload:
    model: torch.nn.Module
    images: torch.Tensor
    masks: torch.Tensor
    texts: list[str]
    tgt_images: torch.Tensor
    tgt_masks: torch.Tensor
    autocast: Callable[[], contextlib.AbstractContextManager]
    step: Callable[[], None]


def make_workload(backbone: str, batch: int, precision: str, device: str = "cpu", **model_kw) -> Workload:
    """OFFSET on ``backbone`` with random batch-``batch`` inputs; ``step()`` is one AdamW training step."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, **model_kw)).to(device).train()
    s = model.preprocess.image_size
    x, m, tx, tm = (torch.randn(batch, 3, s, s, device=device) for _ in range(4))
    texts = ["replace the red circle by a blue striped star, keep the size"] * batch
    opt = torch.optim.AdamW(model.parameter_groups(1e-5, 1e-4))
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in ("fp32", *dtypes):
        raise ValueError(f"precision {precision!r}: expected fp32, bf16 or fp16")
    ctx = (lambda: torch.autocast(device, dtype=dtypes[precision])) if precision in dtypes else contextlib.nullcontext
    # fp16 as the release trains on GPUs: autocast with a grad scaler (docs/model.md#training)
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None

    def step() -> None:
        with ctx():
            loss = model.compute_loss(x, m, texts, tx, tm)["total"]
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)

    return Workload(model, x, m, texts, tx, tm, ctx, step)
