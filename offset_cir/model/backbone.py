"""The CLIP backbone contract of SPEC section 2, over any OpenCLIP ViT.

``Backbone.encode_image`` returns the patch tokens after the final layer norm and the pooled, projected
global feature; ``Backbone.encode_text`` the token features after the final layer norm and the pooled,
projected global feature. Widths, patch grid and context length are read from the OpenCLIP model.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from offset_cir.errors import CheckpointError, OfflineError, UserInputError

log = logging.getLogger(__name__)

# Small configurations the package defines for offline use (random init only). Same schema as OpenCLIP's
# model_configs JSON files.
PACKAGE_BACKBONES: dict[str, dict] = {
    # 64 px, patch 8 -> 8x8 grid; C_v=64, C_t=48, D=32: a training step in well under a second on 2 CPU cores.
    "tiny": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2},
    },
    # 96 px, patch 16 -> 6x6 grid; C_v=96, C_t=64, D=48: a second shape for tests.
    "small": {
        "embed_dim": 48,
        "vision_cfg": {"image_size": 96, "layers": 2, "width": 96, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}


def available_backbones() -> list[str]:
    import open_clip

    return sorted(PACKAGE_BACKBONES) + [m for m in open_clip.list_models() if m.startswith(("ViT", "EVA"))]


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a local file: safetensors, or a torch file loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled modules and other objects are refused
        raise CheckpointError(
            f"{path}: cannot be read as a plain state dict with weights_only=True ({type(exc).__name__}: {exc}). "
            "Save a state dict (model.state_dict()) or a .safetensors file instead of a pickled module."
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return obj


def create_clip(name: str, pretrained: str | None) -> nn.Module:
    """An OpenCLIP CLIP model by name; ``pretrained`` is a tag, a local file, or None."""
    import open_clip
    from open_clip.model import CLIP

    if name in PACKAGE_BACKBONES:
        cfg = PACKAGE_BACKBONES[name]
        model = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
        if pretrained:
            if not Path(pretrained).is_file():
                raise UserInputError(
                    f"backbone {name!r} is a package configuration: pretrained must be a local weights file, "
                    f"got {pretrained!r}"
                )
            _load_into(model, load_weights_file(pretrained), pretrained)
        return model
    if name not in open_clip.list_models():
        raise UserInputError(
            f"unknown backbone {name!r}: expected one of the package configs {sorted(PACKAGE_BACKBONES)} "
            "or an OpenCLIP model name (see `offset info`)"
        )
    if pretrained and Path(pretrained).is_file():
        model = open_clip.create_model(name, pretrained=None)
        _load_into(model, load_weights_file(pretrained), pretrained)
        return model
    if pretrained:
        known = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in known:
            raise UserInputError(
                f"pretrained={pretrained!r} is neither a local file nor an OpenCLIP tag of {name} (tags: {known})"
            )
        if not _hub_reachable():
            # Weights may still be cached locally; try without the network, fail fast otherwise.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            return open_clip.create_model(name, pretrained=pretrained)
        except Exception as exc:
            raise OfflineError(
                f"could not load OpenCLIP weights {name}/{pretrained} ({type(exc).__name__}: {str(exc)[:200]}). "
                "The model hub is not reachable from here: download the weights elsewhere and pass the local file, "
                "e.g. `pretrained=/path/to/open_clip_model.safetensors` (model.pretrained=... on the command line)."
            ) from exc
    return open_clip.create_model(name, pretrained=None)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (first: {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (first: {unexpected[:3]})")
        if wrong:
            parts.append("shape mismatch " + ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3]))
        raise CheckpointError(f"{source}: weights do not fit this backbone: " + "; ".join(parts))
    model.load_state_dict(state)


@dataclass(frozen=True)
class BackboneDims:
    visual_width: int  # C_v
    embed_dim: int  # D
    text_width: int  # C_t
    grid: tuple[int, int]  # h, w
    context_length: int  # L
    image_size: int


class Backbone(nn.Module):
    """An OpenCLIP CLIP model with the token-level outputs OFFSET needs (SPEC section 2)."""

    def __init__(self, name: str, pretrained: str | None = None):
        super().__init__()
        self.name = name
        self.clip = create_clip(name, pretrained)
        visual, clip = self.clip.visual, self.clip
        if not hasattr(visual, "conv1") or getattr(visual, "proj", None) is None:
            raise UserInputError(f"backbone {name!r} is not an OpenCLIP ViT with a visual projection")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
            raise UserInputError(f"backbone {name!r}: attention-pooled or pool-then-norm ViTs are not supported")
        self._text_is_tower = hasattr(clip, "text") and not hasattr(clip, "token_embedding")
        text = clip.text if self._text_is_tower else clip
        text_pool = getattr(text, "pool_type", getattr(clip, "text_pool_type", "argmax"))
        if getattr(text, "cls_emb", None) is not None or text_pool not in ("argmax", "eos", "last"):
            raise UserInputError(f"backbone {name!r}: text tower pooling {text_pool!r} is not supported")
        image_size = visual.image_size
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
        grid = visual.grid_size
        self.dims = BackboneDims(
            visual_width=visual.conv1.out_channels,
            embed_dim=visual.proj.shape[1],
            text_width=text.token_embedding.weight.shape[1],
            grid=(int(grid[0]), int(grid[1])),
            context_length=int(clip.context_length),
            image_size=int(image_size),
        )
        self.eos_token_id = getattr(clip, "text_eos_id", None)
        # OpenCLIP's own forwards, asked once for tokens as well as pooled features: they handle the batch-first
        # or sequence-first layout of each release internally (SPEC section 2 warns against assuming one). The
        # Backbone owns this CLIP; a per-call toggle would not be thread-safe (the search service encodes in threads),
        # so ``self.clip.visual(x)`` (and ``encode_image``) return (pooled, tokens) from here on.
        visual.output_tokens = True
        if self._text_is_tower:
            clip.text.output_tokens = True
    @property
    def visual_proj(self) -> nn.Parameter:
        """W_proj, the backbone's visual projection C_v -> D."""
        return self.clip.visual.proj

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens Z[:,1:] (B x hw x C_v) after the final LN, and g = Z[:,0] @ W_proj (B x D)."""
        pooled, tokens = self.clip.visual(images)
        return tokens, pooled

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features E (B x L x C_t) after the final LN, and t = E[EOT] @ W_text (B x D)."""
        clip = self.clip
        if self._text_is_tower:  # CustomTextCLIP: OpenCLIP's TextTransformer returns both
            pooled, x = clip.text(tokens)
            return x, pooled
        length = tokens.shape[1]
        x = clip.token_embedding(tokens).to(clip.transformer.get_cast_dtype())
        x = x + clip.positional_embedding[:length].to(x.dtype)
        mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        x = clip.ln_final(clip.transformer(x, attn_mask=mask))
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eot_positions(tokens)]
        proj = clip.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return x, pooled

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the end-of-text token per row (OpenCLIP's 'argmax' pooling: EOT has the largest id)."""
        pool = getattr(self.clip, "text_pool_type", "argmax")
        if pool == "eos" and self.eos_token_id is not None:
            return (tokens == self.eos_token_id).int().argmax(dim=-1)
        if pool == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        return tokens.argmax(dim=-1)
