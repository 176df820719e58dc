"""The image tower cut in two for the feature cache: a frozen part that runs once per image and a trainable rest.

``ImageSplit.frozen`` runs the cached part (the whole trunk, or all but its last N blocks) on a copy of the frozen
modules with the batch norms folded into the convolutions, in channels-last layout; ``ImageSplit.live`` runs what
trains (those last blocks, the head, the pooled projection) as ``Backbone.encode_image`` would.
"""
from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn

from offset_cir.device import device_of
from offset_cir.errors import UserInputError

log = logging.getLogger(__name__)


class ImageSplit:
    """The image tower cut in two: ``frozen(images) -> features`` (cached) and ``live(features) -> (tokens, g)``."""

    def __init__(self, backbone, image_blocks: int = 0):
        visual = backbone.clip.visual
        if backbone.vision_kind != "timm-cnn" or getattr(visual.trunk, "output_fmt", "NCHW") != "NCHW":
            raise UserInputError(
                f"the feature cache supports timm CNN image towers (NCHW feature maps); backbone "
                f"{backbone.name!r} has a {backbone.vision_kind!r} image tower: train it without feature_cache")
        self.visual, self.trunk, self.image_blocks = visual, visual.trunk, int(image_blocks)
        self._fast = None  # the folded, channels-last copy of the trunk that ``frozen`` runs (made on first use)
        if self.image_blocks:
            needed = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")
            if not all(hasattr(self.trunk, a) for a in needed):
                raise UserInputError(
                    f"the feature cache with trainable image blocks supports EfficientNet-family trunks; "
                    f"{type(self.trunk).__name__} is not one: use trainable_image_blocks=0 with the cache")
            flat = [b for stage in self.trunk.blocks for b in stage]
            if not 0 < self.image_blocks <= len(flat):
                raise UserInputError(f"trainable_image_blocks: expected 0 to {len(flat)}, got {image_blocks}")
            self.prefix_blocks = flat[: len(flat) - self.image_blocks]
            self.live_blocks = flat[len(flat) - self.image_blocks:]

    def frozen(self, images: torch.Tensor) -> torch.Tensor:
        """The cached part's output (float, NCHW contiguous); run without gradient on a copy of the frozen modules
        (they never change: the cache's fingerprint holds their weights) with its batch norms folded into the
        convolutions before them, in channels-last layout (faster on CPUs: benchmarks/train_speed.py --cache-fill). On first use the
        copy's output is checked against the tower's own."""
        first = self._fast is None
        if first:
            self._fast = copy.deepcopy(self.trunk).requires_grad_(False).eval()
            folded = fold_batch_norms(self._fast)
        if first or device_of(self._fast) != images.device:  # once, not per batch (it walks every parameter)
            self._fast.to(images.device, memory_format=torch.channels_last)
        x = self._run(self._fast, images.contiguous(memory_format=torch.channels_last))
        if first and folded:
            # the folded copy must compute what the tower computes (float32 rounding apart); else run it unfolded
            with torch.no_grad():
                reference = self._run(self.trunk, images)
            bound = 1e-4 * reference.abs().max().item() + 1e-5
            if not (x - reference).abs().max().item() <= bound:
                log.warning("feature cache: folding the batch norms of %s changed its output; running it unfolded",
                            type(self.trunk).__name__)
                self._fast = copy.deepcopy(self.trunk).requires_grad_(False).eval()
                self._fast.to(images.device, memory_format=torch.channels_last)
                x = reference
        return x.contiguous()

    def _run(self, t: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if not self.image_blocks:
            x = t.forward_features(images)
        else:
            flat = [b for stage in t.blocks for b in stage]
            x = t.bn1(t.conv_stem(images))
            for block in flat[: len(flat) - self.image_blocks]:
                x = block(x)
        return x

    def live(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.trunk
        x = features
        if self.image_blocks:
            # channels-last: the trainable blocks' depthwise convolutions run (and back-propagate) faster on CPUs in
            # it; on CPUs they also stay float32 under bf16 autocast, whose backward is slower for them there (OFFSET's
            # matrix products after them are where bf16 pays). benchmarks/train_speed.py --live-blocks measures both.
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", enabled=False) if x.device.type == "cpu" else contextlib.nullcontext():
                for block in self.live_blocks:
                    x = block(x)
                x = t.bn2(t.conv_head(x))
        pooled = self.visual.head(t.forward_head(x))
        return x.flatten(2).transpose(1, 2), pooled

    def frozen_modules(self) -> list[nn.Module]:
        if not self.image_blocks:
            return [self.trunk]
        return [self.trunk.conv_stem, self.trunk.bn1, *self.prefix_blocks]

    def describe(self) -> dict:
        return {"image_blocks": self.image_blocks}


def fold_batch_norms(module: nn.Module) -> int:
    """Fold every batch norm (evaluation statistics) into the convolution registered just before it in the same
    parent, as timm's CNN blocks run them (conv, then norm + activation); the norm's activation stays. Returns
    how many were folded. Only for a frozen copy in evaluation mode."""
    folded = 0
    for parent in list(module.modules()):
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None
                    and bn.num_features == conv.out_channels):
                continue
            with torch.no_grad():
                scale = torch.rsqrt(bn.running_var + bn.eps)
                if bn.affine:
                    scale = scale * bn.weight
                shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0)
                if conv.bias is not None:
                    shift = shift + conv.bias * scale
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                conv.bias = nn.Parameter(shift, requires_grad=False)
            # timm's BatchNormAct2d applies dropout and an activation after the norm: keep those
            parent._modules[b] = nn.Sequential(getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity()))
            folded += 1
    return folded
