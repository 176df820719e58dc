"""Freezing the backbone for small compute: all of it, or all but the last N blocks of each tower.

``freeze_backbone(model, image_blocks=N, text_blocks=M)`` stops the gradient of every backbone parameter except

- those the backbone itself names as new (``clip.new_parameter_names``: the random projections into D of a packaged
  backbone, offset_cir.model.packaged), which train with OFFSET's modules;
- the last ``image_blocks`` blocks of the image tower and everything after them (final norm / head / projection);
- the last ``text_blocks`` blocks of the text tower and everything after them.

Blocks: a timm tower's parameter groups as timm defines them (``group_matcher``: the stem, one group per block, the
head; EfficientNet-Lite0 has 16 blocks), an OpenCLIP ViT's residual blocks, a Hugging Face encoder's layers, an
OpenCLIP text transformer's residual blocks. Frozen modules are also held in evaluation mode (no dropout, stored
batch-norm statistics) even while the model trains, so a frozen part computes the same function in training and
evaluation: what the feature cache (offset_cir.train.cache) relies on.
"""
from __future__ import annotations

import logging
import types

from torch import nn

from offset_cir.errors import UserInputError

log = logging.getLogger(__name__)


def _stay_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def image_block_groups(clip: nn.Module) -> list[list[str]]:
    """Parameter names of the image tower (relative to ``clip``) in block order: [stem, block 1 .. block n, head]."""
    visual = clip.visual
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:  # OpenCLIP TimmModel
        from timm.models._manipulate import group_parameters

        groups = group_parameters(trunk, trunk.group_matcher())
        out = [[f"visual.trunk.{n}" for n in groups[k]] for k in sorted(groups)]
        # timm puts the final norm / head either into the last block's group or into a group of its own (no
        # numbered module in it): the head belongs to the last block here, and is trained with it
        if len(out) > 2 and not any(any(part.isdigit() for part in n.split(".")) for n in out[-1]):
            out[-2] += out.pop()
        out.append([f"visual.{n}" for n, _ in visual.head.named_parameters(prefix="head")])
        return out
    transformer = getattr(visual, "transformer", None)
    if transformer is not None and hasattr(transformer, "resblocks"):  # OpenCLIP ViT
        names = [n for n, _ in visual.named_parameters()]
        blocks = [[f"visual.{n}" for n in names if n.startswith(f"transformer.resblocks.{i}.")]
                  for i in range(len(transformer.resblocks))]
        rest = [n for n in names if not n.startswith("transformer.resblocks.")]
        head_names = ("ln_post", "proj", "attn_pool", "ln_post_")
        head = [f"visual.{n}" for n in rest if n.split(".")[0] in head_names]
        stem = [f"visual.{n}" for n in rest if f"visual.{n}" not in head]
        return [stem, *blocks, head]
    raise UserInputError(f"cannot freeze part of the image tower {type(visual).__name__}: blocks unknown")


def text_block_groups(clip: nn.Module) -> list[list[str]]:
    """Parameter names of the text tower (relative to ``clip``) in block order: [embeddings, blocks .., head]."""
    text = getattr(clip, "text", None)
    if text is not None and hasattr(text, "transformer") and hasattr(text.transformer, "config"):  # HFTextEncoder
        encoder = getattr(text.transformer, "encoder", text.transformer)
        layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
        if layers is None:
            raise UserInputError(f"cannot find the layers of the Hugging Face text tower {type(encoder).__name__}")
        names = [n for n, _ in text.named_parameters()]
        layer_names = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
        by_id = dict(text.named_parameters())
        blocks: list[list[str]] = [[] for _ in layers]
        stem, head = [], []
        seen_layer = False
        for n in names:
            i = layer_names.get(id(by_id[n]))
            if i is not None:
                blocks[i].append(f"text.{n}")
                seen_layer = True
            elif n.startswith("proj") or seen_layer:
                head.append(f"text.{n}")
            else:
                stem.append(f"text.{n}")
        return [stem, *blocks, head]
    owner, prefix = (text, "text.") if text is not None else (clip, "")
    transformer = getattr(owner, "transformer", None)
    if transformer is None or not hasattr(transformer, "resblocks"):
        raise UserInputError(f"cannot freeze part of the text tower of {type(clip).__name__}: blocks unknown")
    names = [n for n, _ in owner.named_parameters()]
    if text is None:
        names = [n for n in names if not n.startswith("visual.")]
    blocks = [[prefix + n for n in names if n.startswith(f"transformer.resblocks.{i}.")]
              for i in range(len(transformer.resblocks))]
    rest = [n for n in names if not n.startswith("transformer.resblocks.")]
    head = [prefix + n for n in rest if n.split(".")[0] in ("ln_final", "text_projection")]
    stem = [prefix + n for n in rest if prefix + n not in head and n not in ("logit_scale", "logit_bias")]
    return [stem, *blocks, head]


def _trainable_tail(groups: list[list[str]], n_blocks: int, what: str) -> set[str]:
    n_total = len(groups) - 2
    if not 0 <= n_blocks <= n_total:
        raise UserInputError(f"{what}: expected 0 to {n_total} trainable last blocks, got {n_blocks}")
    if n_blocks == 0:
        return set()
    return {n for g in groups[-(n_blocks + 1):] for n in g}


def freeze_backbone(model, image_blocks: int = 0, text_blocks: int = 0) -> dict:
    """Freeze ``model.backbone`` except its new projections and the last blocks asked for; returns a summary."""
    clip = model.backbone.clip
    keep = set(getattr(clip, "new_parameter_names", ()))
    if image_blocks:
        keep |= _trainable_tail(image_block_groups(clip), image_blocks, "trainable_image_blocks")
    if text_blocks:
        keep |= _trainable_tail(text_block_groups(clip), text_blocks, "trainable_text_blocks")
    trainable = frozen = 0
    for name, p in clip.named_parameters():
        p.requires_grad_(name in keep)
        if name in keep:
            trainable += p.numel()
        else:
            frozen += p.numel()
    locked = _lock_frozen_modules(clip)
    log.info("backbone frozen: %.2fM parameters frozen, %.2fM trainable (last %d image / %d text blocks, new "
             "projections); %d frozen modules held in eval mode", frozen / 1e6, trainable / 1e6, image_blocks,
             text_blocks, locked)
    return {"frozen_parameters": frozen, "trainable_parameters": trainable, "image_blocks": image_blocks,
            "text_blocks": text_blocks}


def _lock_frozen_modules(root: nn.Module) -> int:
    """Hold every outermost module whose parameters are all frozen in eval mode, whatever ``train()`` says
    (an earlier call's holds are released first)."""
    for module in root.modules():
        if is_frozen_module(module):
            del module.train
    count = 0

    def visit(module: nn.Module) -> None:
        nonlocal count
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.train = types.MethodType(_stay_eval, module)
            module.eval()
            count += 1
            return
        for child in module.children():
            visit(child)

    for child in root.children():
        visit(child)
    return count


def is_frozen_module(module: nn.Module) -> bool:
    """True when ``freeze_backbone`` holds this module in eval mode."""
    return getattr(module.train, "__func__", None) is _stay_eval
