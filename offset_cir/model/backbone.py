"""The CLIP backbone contract (docs/model.md#backbone), over every OpenCLIP tower family.

``Backbone.encode_image`` returns the image's patch tokens (B x hw x C_v) and the pooled, projected global feature
g (B x D) exactly as the tower computes it; ``Backbone.encode_text`` the text's token features (B x L x C_t) and
its pooled, projected global feature t (B x D). ``Backbone.project_visual`` is W_proj, the map C_v -> D that the
VFM applies to its fused token. Widths, grid, context length and normalisation are read from the model. A name is
built by its entry in the backbone registry (:mod:`offset_cir.model.registry`: the package configurations below and
the packaged backbones) or else by OpenCLIP.

Vision towers (``Backbone.vision_kind``):

- ``"vit"``: OpenCLIP's own VisionTransformer (class token, attention-pooled CoCa and pool-then-norm CLIPA
  variants included);
- ``"timm-vit"``: a timm ViT inside OpenCLIP's ``TimmModel`` (SigLIP/SigLIP2, EVA, Perception Encoder,
  MobileCLIP-B/L, ViTamin ...): the patch tokens are the trunk's output without its prefix (class/register) tokens;
- ``"timm-cnn"``: a timm CNN or hierarchical model (ConvNeXt, FastViT/MobileCLIP-S, EfficientNet, Swin ...): the
  final feature map B x C x h x w is the patch grid, its hw positions the tokens.

In every case the tokens are the tower's output up to its pooling, g is the tower's own pooled head on them, and
W_proj(x) is that same head applied to x as the only token (docs/backbones.md gives the reasoning).

Text towers (``Backbone.text_kind``): ``"clip"`` (OpenCLIP CLIP's built-in text transformer), ``"tower"``
(OpenCLIP's TextTransformer in a CustomTextCLIP: SigLIP, EVA, PE ...), ``"hf"`` (OpenCLIP's HFTextEncoder: a
Hugging Face transformer; tokens from its last hidden state, the padding mask from its pad id).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from offset_cir.errors import UserInputError
from offset_cir.model.registry import UNSUPPORTED_TIMM_POOLS, backbone_family
from offset_cir.model.towers import create_clip, make_tokenizer

log = logging.getLogger(__name__)

def _apply_projection(proj, x: torch.Tensor) -> torch.Tensor:
    """A projection that OpenCLIP stores as a [C, D] Parameter, an nn.Module (Linear ...) or None (identity)."""
    if proj is None:
        return x
    if isinstance(proj, nn.Module):
        return proj(x)
    return x @ proj.to(x.dtype)


@dataclass(frozen=True)
class BackboneDims:
    visual_width: int  # C_v
    embed_dim: int  # D
    text_width: int  # C_t
    grid: tuple[int, int]  # h, w
    context_length: int  # L
    image_size: int


class Backbone(nn.Module):
    """An OpenCLIP model with the token-level outputs OFFSET needs (docs/model.md#backbone), over every tower family."""

    def __init__(self, name: str, pretrained: str | None = None, load_weights: bool = True):
        """``load_weights=False``: the architecture of ``pretrained`` without its weights (see :func:`create_clip`)."""
        super().__init__()
        self.name = name
        self.clip = create_clip(name, pretrained, load_weights)
        self.vision_kind = self._vision_kind(self.clip.visual)
        self.text_kind = self._text_kind(self.clip)
        visual_width, grid = self._vision_shape()
        text_width = self._text_width()
        image_size = self.clip.visual.image_size
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
        self.dims = BackboneDims(
            visual_width=int(visual_width),
            embed_dim=self._output_width(visual_width),
            text_width=int(text_width),
            grid=(int(grid[0]), int(grid[1])),
            context_length=int(self.clip.context_length),
            image_size=int(image_size),
        )
        with torch.no_grad():
            text_dim = self.project_text(torch.zeros(1, self.dims.text_width)).shape[-1]
        if text_dim != self.dims.embed_dim:
            raise UserInputError(
                f"backbone {name!r}: the image tower's global feature has width {self.dims.embed_dim}, the text "
                f"tower's {text_dim}; both must be the joint width D")
        # CoCa's captioning decoder is not part of OFFSET: frozen, so that every trainable parameter is used.
        for p in getattr(self.clip, "text_decoder", nn.Identity()).parameters():
            p.requires_grad_(False)
        text = self._text_module
        self.text_pool_type = getattr(text, "pool_type", None) or getattr(self.clip, "text_pool_type", "argmax")
        self.eos_token_id = getattr(text, "eos_id", None) if self.text_kind == "tower" else getattr(self.clip, "text_eos_id", None)
        # OpenCLIP's own forwards, asked once for tokens as well as pooled features: they handle the batch-first
        # or sequence-first layout of each release internally (docs/model.md#backbone warns against assuming one). The
        # Backbone owns this CLIP; a per-call toggle would not be thread-safe (the search service encodes in threads),
        # so ``self.clip.visual(x)`` (and ``encode_image``) return (pooled, tokens) from here on for OpenCLIP ViTs.
        if self.vision_kind == "vit":
            self.clip.visual.output_tokens = True
        if self.text_kind == "tower":
            self.clip.text.output_tokens = True

    def train(self, mode: bool = True) -> "Backbone":
        """Train mode everywhere except batch norms, which keep their stored statistics (their affine parameters
        still train): batch statistics would mix the samples of a batch, and docs/model.md#backbone encodes an item's image
        and mask (and the targets) in one call on the premise that no layer does (timm CNNs: FastViT, EfficientNet)."""
        super().train(mode)
        for module in self.clip.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    # ------------------------------------------------------------ inspection
    def _vision_kind(self, visual: nn.Module) -> str:
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        if isinstance(visual, VisionTransformer):
            if isinstance(getattr(visual, "attn_pool_contrastive", None), nn.Module):
                raise UserInputError(
                    f"backbone {self.name!r}: OpenCLIP's parallel/cascade attention pooler is not supported")
            if visual.proj is None:
                raise UserInputError(f"backbone {self.name!r}: an OpenCLIP ViT without a visual projection")
            return "vit"
        if isinstance(visual, TimmModel):
            trunk = visual.trunk
            if "pool" in visual.head._modules:  # OpenCLIP's abs_attn / rot_attn head
                raise UserInputError(
                    f"backbone {self.name!r}: timm towers with OpenCLIP's attention-pool head "
                    f"({UNSUPPORTED_TIMM_POOLS}) are not supported")
            if hasattr(trunk, "num_prefix_tokens") and hasattr(trunk, "patch_embed"):
                return "timm-vit"
            return "timm-cnn"
        from open_clip.modified_resnet import ModifiedResNet

        if isinstance(visual, ModifiedResNet):
            return "resnet"
        raise UserInputError(
            f"backbone {self.name!r}: vision tower {type(visual).__name__} is not supported "
            "(OpenCLIP ViTs, ModifiedResNets and timm towers are)")

    def _text_kind(self, clip: nn.Module) -> str:
        from open_clip.hf_model import HFTextEncoder
        from open_clip.transformer import TextTransformer

        text = getattr(clip, "text", None)
        if isinstance(text, HFTextEncoder):
            return "hf"
        if isinstance(text, TextTransformer):
            if text.pool_type not in ("argmax", "eos", "last", "first") and text.cls_emb is None:
                raise UserInputError(f"backbone {self.name!r}: text tower pooling {text.pool_type!r} is not supported")
            return "tower"
        if hasattr(clip, "token_embedding"):
            if clip.text_pool_type not in ("argmax", "eos", "last", "first"):
                raise UserInputError(
                    f"backbone {self.name!r}: text tower pooling {clip.text_pool_type!r} is not supported")
            return "clip"
        raise UserInputError(f"backbone {self.name!r}: text tower {type(text).__name__} is not supported")

    @property
    def pad_token_id(self) -> int:
        """The id the tokenizer pads with, as the text tower knows it (HF: its config; OpenCLIP: 0)."""
        if self.text_kind == "hf":
            return self.clip.text.config.pad_token_id
        if self.text_kind == "tower":
            return getattr(self.clip.text, "pad_id", 0)
        return 0  # OpenCLIP's tokenizers pad with 0

    @property
    def _text_module(self) -> nn.Module:
        return self.clip if self.text_kind == "clip" else self.clip.text

    def _vision_shape(self) -> tuple[int, tuple[int, int]]:
        visual = self.clip.visual
        if self.vision_kind == "vit":
            return visual.conv1.out_channels, tuple(visual.grid_size)
        if self.vision_kind == "resnet":
            side = visual.image_size // 32  # the attention pool's positional grid
            return visual.attnpool.k_proj.in_features, (side, side)
        trunk = visual.trunk
        if self.vision_kind == "timm-vit":
            return trunk.num_features, tuple(trunk.patch_embed.grid_size)
        # CNN: the last stage's reduction; stride-2 convolutions with "same" padding round up.
        size = visual.image_size
        reduction = trunk.feature_info[-1]["reduction"]
        return trunk.num_features, (math.ceil(size[0] / reduction), math.ceil(size[1] / reduction))

    def _text_width(self) -> int:
        if self.text_kind == "clip":
            return self.clip.token_embedding.weight.shape[1]
        if self.text_kind == "tower":
            return self.clip.text.width
        from open_clip.hf_configs import arch_dict

        cfg = self.clip.text.config
        return getattr(cfg, arch_dict[cfg.model_type]["config_names"]["width"])

    def _output_width(self, visual_width: int) -> int:
        """D, read off W_proj itself (one zero token through it, no gradient, eval mode)."""
        visual = self.clip.visual
        was_training = visual.training
        visual.eval()
        try:
            with torch.no_grad():
                param = next(visual.parameters())
                d = self.project_visual(torch.zeros(2, visual_width, dtype=param.dtype, device=param.device)).shape[-1]
        finally:
            visual.train(was_training)
        return int(d)

    @property
    def family(self) -> str:
        """The tower family, as `offset info` lists it (the tower kinds for a model built some other way)."""
        try:
            listed = backbone_family(self.name)
        except Exception:  # a name OpenCLIP does not know
            listed = None
        return listed or f"{self.vision_kind} vision + {self.text_kind} text"

    # --------------------------------------------------------------- W_proj
    @property
    def visual_proj(self):
        """W_proj as the tower stores it: the [C_v, D] Parameter of an OpenCLIP ViT, else the head module.
        Use :meth:`project_visual` to apply it."""
        visual = self.clip.visual
        return visual.proj if self.vision_kind == "vit" else visual.head

    def project_visual(self, x: torch.Tensor) -> torch.Tensor:
        """W_proj: tokens [..., C_v] -> [..., D], the tower's pooled head applied to each token as the only token.

        OpenCLIP ViT: x @ proj (after ln_post for pool-then-norm towers; through the attention pooler and ln_post
        for CoCa). ModifiedResNet: its attention pool adds a fixed positional grid, so one token is read as the map
        that holds it at every position (the same thing for every other head). timm ViT: pooling of one token (attention pooling over one key is its value path) -> fc_norm
        -> head -> OpenCLIP's projection. timm CNN: the head on a 1x1 map -> OpenCLIP's projection.
        """
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        visual = self.clip.visual
        if self.vision_kind == "vit":
            if visual.attn_pool is not None:
                pooled, _ = visual._global_pool(visual.ln_post(visual.attn_pool(x[:, None])))
            elif visual.final_ln_after_pool:
                pooled = visual.ln_post(x)
            else:
                pooled = x
            out = _apply_projection(visual.proj, pooled)
        elif self.vision_kind == "resnet":
            h, w = self.dims.grid if hasattr(self, "dims") else self._vision_shape()[1]
            out = visual.attnpool(x[:, :, None, None].expand(-1, -1, h, w))
        elif self.vision_kind == "timm-vit":
            trunk = visual.trunk
            if getattr(trunk, "attn_pool", None) is not None or trunk.global_pool == "token":
                seq = x[:, None]
            else:  # avg / max pooling skips the prefix tokens: put zero ones in front of the single token
                seq = torch.cat([x.new_zeros(x.shape[0], trunk.num_prefix_tokens, x.shape[1]), x[:, None]], dim=1)
            out = visual.head(trunk.forward_head(seq))
        else:
            trunk = visual.trunk
            fmap = x[:, None, None, :] if getattr(trunk, "output_fmt", "NCHW") == "NHWC" else x[:, :, None, None]
            out = visual.head(trunk.forward_head(fmap))
        return out.reshape(*lead, out.shape[-1])

    def project_text(self, x: torch.Tensor) -> torch.Tensor:
        """W_text: text tokens [..., C_t] -> [..., D], the tower's own projection of its pooled feature."""
        if self.text_kind == "clip":
            return _apply_projection(self.clip.text_projection, x)
        if self.text_kind == "tower":
            return _apply_projection(self.clip.text.text_projection, x)
        return self.clip.text.proj(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)

    # --------------------------------------------------------------- images
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens (B x hw x C_v) and g (B x D), g exactly as the tower's own forward computes it."""
        visual = self.clip.visual
        if self.vision_kind == "vit":
            if visual.attn_pool is None:
                pooled, tokens = visual(images)  # tokens after ln_post (before it, for pool-then-norm towers)
                return tokens, pooled
            # CoCa: OpenCLIP returns the pooler's queries as tokens; OFFSET needs the patches (before the pooler).
            x = visual.transformer(visual._embeds(images))
            pooled, _ = visual._pool(x)
            return x[:, 1:], pooled @ visual.proj
        if self.vision_kind == "resnet":
            x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
            return x.flatten(2).transpose(1, 2), visual.attnpool(x)
        trunk = visual.trunk
        feats = trunk.forward_features(images)
        pooled = visual.head(trunk.forward_head(feats))
        if self.vision_kind == "timm-vit":
            tokens = feats[:, trunk.num_prefix_tokens:]
        elif getattr(trunk, "output_fmt", "NCHW") == "NHWC":
            tokens = feats.flatten(1, 2)
        else:
            tokens = feats.flatten(2).transpose(1, 2)
        return tokens, pooled

    # ----------------------------------------------------------------- text
    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features E (B x L x C_t) and t (B x D), t exactly as the tower's own forward computes it."""
        clip = self.clip
        if self.text_kind == "tower":  # CustomTextCLIP: OpenCLIP's TextTransformer returns both
            pooled, x = clip.text(tokens)
            return x, pooled
        if self.text_kind == "hf":
            text = clip.text
            attention = (tokens != self.pad_token_id).long()
            out = text.transformer(input_ids=tokens, attention_mask=attention)
            pooled = text.proj(text.pooler(out, attention))
            return out.last_hidden_state, pooled
        length = tokens.shape[1]
        x = clip.token_embedding(tokens).to(clip.transformer.get_cast_dtype())
        x = x + clip.positional_embedding[:length].to(x.dtype)
        mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        x = clip.ln_final(clip.transformer(x, attn_mask=mask))
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eot_positions(tokens)]
        return x, _apply_projection(clip.text_projection, pooled)

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the pooled (end-of-text) position per row, by the text tower's own pooling rule.

        'argmax': EOT has the largest id (OpenCLIP's BPE); 'eos': the first ``eos_id``; 'last'/'first': the last or
        first position; HF towers: the last non-padding position.
        """
        batch, length = tokens.shape
        if self.text_kind == "hf":
            return self.text_attention_mask(tokens).long().cumsum(dim=1).argmax(dim=1)
        pool = self.text_pool_type
        if self.text_kind == "tower" and self.clip.text.cls_emb is not None:
            pool = "last"  # CoCa appends a class token after the text; its last text position
        if pool == "eos" and self.eos_token_id is not None:
            return (tokens == self.eos_token_id).int().argmax(dim=-1)
        if pool == "last":
            return torch.full((batch,), length - 1, dtype=torch.long, device=tokens.device)
        if pool == "first":
            return torch.zeros(batch, dtype=torch.long, device=tokens.device)
        return tokens.argmax(dim=-1)

    def text_attention_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bool [B, L]: True where a position holds text, False for padding (D14's mask), for any tokenizer.

        EOT-pooled towers ('argmax', 'eos'): positions up to the EOT; HF towers: the attention mask the tower
        itself uses (ids different from its pad id); 'last'/'first' towers (SigLIP ...): ids different from the pad
        id. A row is never left empty (its first position stays valid).
        """
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        pool = self.text_pool_type
        if self.text_kind != "hf" and pool in ("argmax", "eos") and not (
            self.text_kind == "tower" and self.clip.text.cls_emb is not None
        ):
            return positions <= self.eot_positions(tokens)[:, None]
        valid = tokens != self.pad_token_id
        valid[:, 0] |= ~valid.any(dim=1)
        return valid

    # ------------------------------------------------------------ tokenizer
    def make_tokenizer(self):
        """The tokenizer of this backbone (offline): the packaged one, a local HF folder's, OpenCLIP's."""
        return make_tokenizer(self.name, self.dims.context_length, self)
