"""The OFFSET model (docs/model.md): reference branch, text branch, revision, target branch, losses."""
from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from offset_cir.model.backbone import Backbone
from offset_cir.model.config import ModelConfig
from offset_cir.model.focus import FocusProjection, FocusRevision, TextualFocusMapping, VisualFocusMapping, mean_pool
from offset_cir.model.losses import batch_based_classification, focus_regularisation, focus_teacher
from offset_cir.model.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess

log = logging.getLogger(__name__)

# gather(x) -> (x from every rank concatenated, index of this rank's first row); None = single process.
Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def build_model(config: ModelConfig | None = None, *, load_weights: bool = True, **overrides) -> "OFFSET":
    """Build OFFSET from a ``ModelConfig`` (keyword overrides are applied on top). ``load_weights=False``: the
    architecture only, no pretrained weights read or fetched; ``config.pretrained`` is kept as given."""
    import dataclasses

    config = config or ModelConfig()
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return OFFSET(config, load_weights=load_weights)


def _zero_key_part(width: int, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of a [q | k | v] in-projection bias with its key part set to exactly zero."""
    grad = grad.clone()
    grad[width : 2 * width] = 0
    return grad


def _exact_zero_key_bias_gradients(module: nn.Module) -> int:
    """Give the key bias of every dot-product attention in ``module`` an exactly zero gradient; returns the count.

    A key bias adds the same q . b_k to every score of a query, which the softmax ignores: its true gradient is
    zero, but the attention kernel's backward leaves float rounding there (~1e-9), and AdamW normalises that noise
    into lr-sized steps, so those biases would drift at random and differ between runs
    (docs/model.md#implementation). Only ``nn.MultiheadAttention`` (OpenCLIP's ViTs) is treated: its bias is laid
    out [q | k | v].
    """
    count = 0
    for sub in module.modules():
        bias = getattr(sub, "in_proj_bias", None)
        if isinstance(sub, nn.MultiheadAttention) and isinstance(bias, nn.Parameter) and bias.requires_grad:
            bias.register_hook(functools.partial(_zero_key_part, bias.shape[0] // 3))
            count += 1
    return count


class OFFSET(nn.Module):
    """Composed image retrieval with segmentation-based focus shift revision (Chen et al., ACM MM 2025).

    ``encode_query(images, masks, texts)`` and ``encode_target(images, masks)`` return L2-normalised [B, D]
    features; ``compute_loss`` returns ``{"total", "bbc", "fr"}``.
    """

    def __init__(self, config: ModelConfig, load_weights: bool = True):
        """``load_weights=False`` builds the architecture of ``config`` (``pretrained`` names its normalisation)
        without reading or fetching the pretrained weights, for weights loaded next (a checkpoint, a resume)."""
        super().__init__()
        self.config = cfg = config
        if cfg.focus_channels is None:
            raise ValueError("ModelConfig.focus_channels is unset (None): give P, or let convert_release_checkpoint "
                             "read it from the release's weights")
        self.backbone = Backbone(cfg.backbone, cfg.pretrained, load_weights=load_weights)
        dims = self.backbone.dims
        c_v, d, c_t = dims.visual_width, dims.embed_dim, dims.text_width
        self.embed_dim = d
        self.image_fc = nn.Linear(c_v, d)  # FC_I
        self.text_fc = nn.Linear(c_t, d)  # FC_T
        self.vfm = VisualFocusMapping(c_v, cfg.vfm_heads) if (cfg.use_reference_vfm or cfg.use_target_vfm) else None
        self.tfm = TextualFocusMapping(d, cfg.tfm_heads, cfg.tfm_attention) if cfg.use_tfm else None
        separate = cfg.p_local != cfg.p_global  # D1
        if cfg.use_focus_projection:
            self.visual_projection = FocusProjection(d, cfg.p_global)
            self.visual_projection_local = FocusProjection(d, cfg.p_local) if separate else None
            self.text_projection = FocusProjection(d, cfg.p_global)
            self.text_projection_local = FocusProjection(d, cfg.p_local) if separate else None
        else:
            self.visual_projection = self.visual_projection_local = None
            self.text_projection = self.text_projection_local = None
        self.revision = FocusRevision(d, cfg.gate_split) if cfg.use_revision else None
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.logit_scale_init))) if cfg.use_bbc_loss else None
        pcfg = getattr(self.backbone.clip.visual, "preprocess_cfg", None) or {}
        self.preprocess = Preprocess(
            dims.image_size, pcfg.get("mean", OPENAI_MEAN), pcfg.get("std", OPENAI_STD), shared_crop=cfg.shared_crop
        )
        self.tokenizer = self.backbone.make_tokenizer()  # the tower's own (packaged, HF folder, OpenCLIP's)
        if cfg.grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        # CLIP's own contrastive temperature is not part of OFFSET: freeze it so every trainable parameter
        # is used (DistributedDataParallel then needs no unused-parameter search).
        for name in ("logit_scale", "logit_bias"):
            p = getattr(self.backbone.clip, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(False)
        _exact_zero_key_bias_gradients(self.backbone)

    # ----------------------------------------------------------------- helpers
    @property
    def uses_masks(self) -> bool:
        """Whether the model uses dominant-portion masks at all (``ModelConfig.use_masks``; False: "w/o FM")."""
        return self.config.use_masks

    @property
    def uses_query_mask(self) -> bool:
        """Whether ``encode_query`` uses the reference's mask (its VFM or TFM is on)."""
        return self.config.use_reference_vfm or self.config.use_tfm

    @property
    def uses_target_mask(self) -> bool:
        """Whether ``encode_target`` uses the target's mask (its VFM is on; off for "w/o Target_VFM")."""
        return self.config.use_target_vfm

    @property
    def device(self) -> torch.device:
        return self.image_fc.weight.device

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts)).to(self.device)

    def _encode_images(self, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Encode several image batches; in one backbone call when ``batch_encoder_calls`` (docs/model.md#backbone)."""
        if self.config.batch_encoder_calls and len(batches) > 1:
            tokens, pooled = self.backbone.encode_image(torch.cat(batches))
            sizes = [b.shape[0] for b in batches]
            return list(zip(tokens.split(sizes), pooled.split(sizes)))
        return [self.backbone.encode_image(b) for b in batches]

    def _require_masks(self, masks, images, needed: bool, role: str) -> None:
        """Where this configuration uses a branch's masks, refuse a missing one (None is the one "no mask" value)
        and one that is not an image-shaped [B, 3, H, W] tensor beside its images."""
        if not needed:
            return
        if masks is None:
            raise ValueError(
                f"{role} masks are required by this model configuration (use_masks=True); "
                "pass the dominant-portion masks or use the 'wo_fm' ablation"
            )
        if tuple(masks.shape) != tuple(images.shape):
            raise ValueError(f"{role} masks have shape {tuple(masks.shape)}, their images {tuple(images.shape)}: "
                             "each mask is rendered as an image of its image's size (model.preprocess.mask)")

    def _pool(self, tokens, projection: FocusProjection | None, attention: bool, valid=None) -> torch.Tensor:
        return projection(tokens, valid) if attention and projection is not None else mean_pool(tokens, valid)

    # ------------------------------------------------------------ visual sets
    def _visual_sets(self, image_enc, mask_enc, use_vfm: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Global set (3 tokens with VFM, else [g]) and local set [B, hw, D] of one image (docs/model.md#vfm)."""
        tokens, g = image_enc
        if not use_vfm:
            return g[:, None], self.image_fc(tokens)
        mask_tokens, g_m = mask_enc
        fused = self.vfm(tokens, mask_tokens)  # F_l' [B, hw, C_v]
        first = fused[:, 0] if self.config.global_token == "first" else fused.mean(dim=1)  # D11
        global_set = torch.stack([self.backbone.project_visual(first) + g, g, g_m], dim=1)  # W_proj, any tower
        return global_set, self.image_fc(fused)

    def _visual_tokens(self, global_set, local_set, attention: bool) -> torch.Tensor:
        local_proj = self.visual_projection_local or self.visual_projection
        return torch.cat(
            [self._pool(global_set, self.visual_projection, attention), self._pool(local_set, local_proj, attention)],
            dim=1,
        )

    # -------------------------------------------------------------- text sets
    def _text_tokens(self, tokens_ids, mask_enc) -> torch.Tensor:
        cfg = self.config
        text_tokens, t = self.backbone.encode_text(tokens_ids)
        valid = None
        if cfg.text_padding == "mask":  # D14: padding (positions after EOT) leaves MG-FP's softmax, any tokenizer
            valid = self.backbone.text_attention_mask(tokens_ids)
        if self.tfm is not None:
            mask_tokens, g_m = mask_enc
            extra = {}
            if cfg.tfm_attention == "tokens":
                extra = dict(
                    mask_tokens=self.backbone.project_visual(mask_tokens),
                    text_tokens=self.backbone.project_text(text_tokens),
                    text_valid=valid,
                )
            s = self.tfm(t, g_m, **extra)
            global_set = torch.stack([s + t, t, g_m], dim=1)
        else:
            global_set = t[:, None]
        local_set = self.text_fc(text_tokens)
        local_proj = self.text_projection_local or self.text_projection
        attention = cfg.use_focus_projection
        return torch.cat(
            [self._pool(global_set, self.text_projection, attention), self._pool(local_set, local_proj, attention, valid)],
            dim=1,
        )

    def _compose(self, visual_tokens, text_tokens) -> torch.Tensor:
        if self.revision is None:  # ablation (7)
            return visual_tokens + text_tokens
        return self.revision(visual_tokens, text_tokens)

    # ------------------------------------------------------------- public API
    def _as_tokens(self, texts) -> torch.Tensor:
        if isinstance(texts, torch.Tensor):
            return texts.to(self.device)
        return self.tokenize(texts)

    def query_tokens(self, images, masks, texts, image_enc=None, mask_enc=None) -> torch.Tensor:
        """F_c [B, K, D]: the composed token set before the mean (docs/model.md#tgfr)."""
        cfg = self.config
        if image_enc is None:
            need = self.uses_query_mask
            self._require_masks(masks, images, need, "reference")
            encs = self._encode_images([images, masks] if need else [images])
            image_enc, mask_enc = encs[0], (encs[1] if need else None)
        global_set, local_set = self._visual_sets(image_enc, mask_enc, cfg.use_reference_vfm)
        visual = self._visual_tokens(global_set, local_set, cfg.use_focus_projection)
        text = self._text_tokens(self._as_tokens(texts), mask_enc)
        return self._compose(visual, text)

    def target_tokens(self, images, masks, image_enc=None, mask_enc=None) -> torch.Tensor:
        """F_t [B, K, D]: target through VFM and the shared visual MG-FP, no text (docs/model.md#target)."""
        cfg = self.config
        if image_enc is None:
            need = self.uses_target_mask
            self._require_masks(masks, images, need, "target")
            encs = self._encode_images([images, masks] if need else [images])
            image_enc, mask_enc = encs[0], (encs[1] if need else None)
        global_set, local_set = self._visual_sets(image_enc, mask_enc, cfg.use_target_vfm)
        return self._visual_tokens(global_set, local_set,
                                   cfg.use_focus_projection and cfg.use_target_focus_projection)

    def encode_query(self, images, masks, texts) -> torch.Tensor:
        return F.normalize(self.query_tokens(images, masks, texts).mean(dim=1), dim=-1)

    def encode_target(self, images, masks=None) -> torch.Tensor:
        return F.normalize(self.target_tokens(images, masks).mean(dim=1), dim=-1)

    def forward(self, ref_images, ref_masks, texts, tgt_images, tgt_masks):
        """(query features, target features, target tokens), encoding all images in one backbone call."""
        need_q, need_t = self.uses_query_mask, self.uses_target_mask
        self._require_masks(ref_masks, ref_images, need_q, "reference")
        self._require_masks(tgt_masks, tgt_images, need_t, "target")
        batches = [ref_images] + ([ref_masks] if need_q else []) + [tgt_images] + ([tgt_masks] if need_t else [])
        encs = iter(self._encode_images(batches))
        ref_enc = next(encs)
        ref_mask_enc = next(encs) if need_q else None
        tgt_enc = next(encs)
        tgt_mask_enc = next(encs) if need_t else None
        f_c = self.query_tokens(None, None, texts, image_enc=ref_enc, mask_enc=ref_mask_enc)
        f_t = self.target_tokens(None, None, image_enc=tgt_enc, mask_enc=tgt_mask_enc)
        q = F.normalize(f_c.mean(dim=1), dim=-1)
        k = F.normalize(f_t.mean(dim=1), dim=-1)
        return q, k, f_t

    def compute_loss(self, ref_images, ref_masks, texts, tgt_images, tgt_masks, gather: Gather | None = None) -> dict:
        """{"total", "bbc", "fr"} for a batch of triplets (docs/model.md#losses). ``gather`` spans negatives over ranks."""
        q, k, f_t = self(ref_images, ref_masks, texts, tgt_images, tgt_masks)
        return self.loss_from_features(q, k, f_t, gather)

    def loss_from_features(self, q, k, f_t, gather: Gather | None = None) -> dict:
        """The losses from ``forward``'s outputs (the trainer calls the DDP-wrapped forward, then this)."""
        cfg = self.config
        q, k = q.float(), k.float()
        teacher = focus_teacher(f_t.float())
        if gather is not None:
            keys, offset = gather(k)
            teacher_all, _ = gather(teacher)
        else:
            keys, offset, teacher_all = k, 0, teacher
        labels = torch.arange(q.shape[0], device=q.device) + offset
        zero = q.new_zeros(())
        bbc = batch_based_classification(q, keys, self.logit_scale.float(), labels) if cfg.use_bbc_loss else zero
        fr = focus_regularisation(q, keys, teacher, teacher_all, cfg.tau) if cfg.use_fr_loss else zero
        total = (bbc if cfg.use_bbc_loss else zero) + (cfg.mu * fr if cfg.use_fr_loss else zero)
        return {"total": total, "bbc": bbc, "fr": fr}

    # -------------------------------------------------------- optimiser groups
    def parameter_groups(self, backbone_lr: float = 1e-5, new_lr: float = 1e-4, weight_decay: float = 0.01) -> list[dict]:
        """Backbone parameters (W_proj included) vs the new modules and the logit scale (docs/model.md#training).

        Parameters a backbone itself names as new (``clip.new_parameter_names``: the random projections into D of
        a packaged backbone, see offset_cir.model.packaged) train with the new modules."""
        fresh = set(getattr(self.backbone.clip, "new_parameter_names", ()))
        backbone = [p for n, p in self.backbone.named_parameters()
                    if p.requires_grad and n.removeprefix("clip.") not in fresh]
        ids = {id(p) for p in backbone}
        new = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [
            {"params": backbone, "lr": backbone_lr, "weight_decay": weight_decay, "name": "backbone"},
            {"params": new, "lr": new_lr, "weight_decay": weight_decay, "name": "new_modules"},
        ]
