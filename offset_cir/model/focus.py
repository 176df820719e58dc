"""OFFSET's new modules (docs/model.md#modules): Visual and Textual Focus Mapping, Multi-Grained Focus Projection,
Textually Guided Focus Revision.

Token sets are [B, N, C]. The 1x1 convolutions are stored as ``Conv1d(kernel_size=1)`` parameters (a 1x1 Conv2d
on an h x w map is the same map on its hw positions) and applied as linear maps over channels, so one
attention routine serves both focus mappings.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def pointwise(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied to tokens [B, N, C_in] -> [B, N, C_out] (a linear map over channels;
    much faster on CPUs than the convolution kernel, same weights and result)."""
    return F.linear(x, conv.weight[:, :, 0], conv.bias)


def split_heads_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, N, 3C] -> q, k, v each [B, heads, N, C/heads].

    The release lays the qkv output channels out per head: head h owns channels [h*3d, (h+1)*3d) as
    [q | k | v] blocks of head width d (docs/model.md#release-checkpoints).
    """
    b, n, c3 = qkv.shape
    d = c3 // (3 * heads)
    q, k, v = qkv.view(b, n, heads, 3 * d).transpose(1, 2).split(d, dim=-1)
    return q, k, v


def value_weight(qkv: nn.Conv1d, heads: int) -> torch.Tensor:
    """The value rows of a release-layout qkv map (per head [q | k | v], docs/model.md#release-checkpoints) as a [C, C_in] matrix,
    heads in order: ``x @ value_weight(...).T`` equals the concatenated per-head values of ``split_heads_qkv``."""
    c3, c_in = qkv.weight.shape[:2]
    d = c3 // (3 * heads)
    return qkv.weight[:, :, 0].view(heads, 3, d, c_in)[:, 2].reshape(heads * d, c_in)


def attend(q, k, v, scale: float, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v per head; q [B,H,Nq,d], k/v [B,H,Nk,d] -> [B, Nq, H*d]."""
    mask = None if key_valid is None else key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # B, H, Nq, d
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


class VisualFocusMapping(nn.Module):
    """VFM (docs/model.md#vfm): two-way cross-attention between image and mask patch maps, then a 1x1 fusion.

    Image stream: queries from the mask, keys and values from the image; mask stream the other way round.
    The scale is 1/sqrt(C_v) over all channels and the residual adds the GroupNorm-ed input, as in the release.
    """

    def __init__(self, width: int, heads: int = 4, groups: int = 16):
        super().__init__()
        if width % heads or width % groups:
            raise ValueError(f"VisualFocusMapping: width {width} must divide by heads={heads} and groups={groups}")
        self.heads = heads
        self.scale = 1.0 / math.sqrt(width)
        self.norm_image = nn.GroupNorm(groups, width)
        self.norm_mask = nn.GroupNorm(groups, width)
        self.qkv_image = nn.Conv1d(width, 3 * width, 1, bias=False)
        self.qkv_mask = nn.Conv1d(width, 3 * width, 1, bias=False)
        self.out_image = nn.Conv1d(width, width, 1)
        self.out_mask = nn.Conv1d(width, width, 1)
        self.fusion = nn.Conv1d(2 * width, width, 1)

    def forward(self, image_tokens: torch.Tensor, mask_tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens A0, S0 [B, hw, C_v] -> fused mask-aware map F_l' [B, hw, C_v]."""
        a = self.norm_image(image_tokens.transpose(1, 2)).transpose(1, 2)  # B, hw, C
        s = self.norm_mask(mask_tokens.transpose(1, 2)).transpose(1, 2)
        q_a, k_a, v_a = split_heads_qkv(pointwise(self.qkv_image, a), self.heads)
        q_s, k_s, v_s = split_heads_qkv(pointwise(self.qkv_mask, s), self.heads)
        o_a = pointwise(self.out_image, attend(q_s, k_a, v_a, self.scale)) + a
        o_s = pointwise(self.out_mask, attend(q_a, k_s, v_s, self.scale)) + s
        return pointwise(self.fusion, torch.cat([o_a, o_s], dim=-1))


class TextualFocusMapping(nn.Module):
    """TFM (docs/model.md#tfm and #d10): fuse the text global feature t with the mask global feature g_m.

    ``attention="degenerate"`` (release): each stream is a cross-attention over sequences of length one, so the
    softmax is 1 and u_t = Out_t(V_t t) + t, u_m = Out_m(V_m g_m) + g_m. ``"tokens"``: t attends to the mask's
    patch tokens and g_m to the text tokens (both in the joint space D).
    """

    def __init__(self, dim: int, heads: int = 4, attention: str = "degenerate"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"TextualFocusMapping: width {dim} must divide by heads={heads}")
        self.heads, self.attention = heads, attention
        self.scale = 1.0 / math.sqrt(dim)
        self.qkv_text = nn.Conv1d(dim, 3 * dim, 1, bias=False)
        self.qkv_mask = nn.Conv1d(dim, 3 * dim, 1, bias=False)
        self.out_text = nn.Conv1d(dim, dim, 1)
        self.out_mask = nn.Conv1d(dim, dim, 1)
        self.fusion = nn.Conv1d(2 * dim, dim, 1)

    def forward(self, text_global, mask_global, mask_tokens=None, text_tokens=None, text_valid=None) -> torch.Tensor:
        """t, g_m [B, D] (and, for "tokens", mask patch tokens [B, hw, D], text tokens [B, L, D]) -> s [B, D]."""
        t, m = text_global[:, None], mask_global[:, None]  # B, 1, D
        if self.attention == "degenerate":
            # The release attends over one key per stream: the softmax is exactly 1 whatever the queries and keys,
            # so the output is the value itself. Queries and keys are not computed at all: their true gradient is
            # zero, and an attention kernel's backward would leave rounding noise there that AdamW turns into
            # lr-sized drifts of the q/k rows (docs/model.md#implementation). The q/k rows stay in the weights
            # (release layout).
            u_t = pointwise(self.out_text, F.linear(t, value_weight(self.qkv_text, self.heads))) + t
            u_m = pointwise(self.out_mask, F.linear(m, value_weight(self.qkv_mask, self.heads))) + m
        else:
            q_t, _, _ = split_heads_qkv(pointwise(self.qkv_text, t), self.heads)
            _, k_mt, v_mt = split_heads_qkv(pointwise(self.qkv_mask, mask_tokens), self.heads)
            q_m, _, _ = split_heads_qkv(pointwise(self.qkv_mask, m), self.heads)
            _, k_tt, v_tt = split_heads_qkv(pointwise(self.qkv_text, text_tokens), self.heads)
            u_t = pointwise(self.out_text, attend(q_t, k_mt, v_mt, self.scale)) + t
            u_m = pointwise(self.out_mask, attend(q_m, k_tt, v_tt, self.scale, key_valid=text_valid)) + m
        return pointwise(self.fusion, torch.cat([u_t, u_m], dim=-1))[:, 0]


class FocusProjection(nn.Module):
    """MG-FP (docs/model.md#mgfp): attention pooling of a token set into P focus channels.

    W = softmax_N(Conv(D/2 -> P)(tanh(Conv(D -> D/2)(X^T)))), output W @ X: [B, N, D] -> [B, P, D].
    """

    def __init__(self, dim: int, channels: int):
        super().__init__()
        self.channels = channels
        self.score = nn.Sequential(
            nn.Conv1d(dim, dim // 2, 1, bias=False), nn.Tanh(), nn.Conv1d(dim // 2, channels, 1, bias=False)
        )

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        conv_in, _, conv_out = self.score
        logits = pointwise(conv_out, torch.tanh(pointwise(conv_in, tokens))).transpose(1, 2)  # B, P, N
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        return torch.matmul(logits.softmax(dim=-1), tokens)


def mean_pool(tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The "w/o MG-FP" ablation: one token, the (masked) mean of the set: [B, N, D] -> [B, 1, D]."""
    if valid is None:
        return tokens.mean(dim=1, keepdim=True)
    w = valid.to(tokens.dtype)[:, :, None]
    return (tokens * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1)


class FocusRevision(nn.Module):
    """TGFR (docs/model.md#tgfr and #d4): sigmoid gates from [F_r ; F_m] mix the visual and textual token sets.

    G = sigmoid(Conv(D -> 2D)(LeakyReLU(Conv(2D -> D)([F_r ; F_m])))) is [B, K, 2D] for K tokens.
    ``split="release"`` reshapes G to [B, 2K, D] and splits along tokens (the visual gate of token i is half
    i mod 2 of G's token floor(i/2); the text gate is half i mod 2 of token K/2 + floor(i/2));
    ``split="per_token"`` takes gate_v = G[..., :D] and gate_t = G[..., D:] of the same token.
    """

    def __init__(self, dim: int, split: str = "release"):
        super().__init__()
        self.split = split
        self.mlp = nn.Sequential(nn.Conv1d(2 * dim, dim, 1), nn.LeakyReLU(), nn.Conv1d(dim, 2 * dim, 1))

    def gates(self, visual: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conv_in, act, conv_out = self.mlp
        g = torch.sigmoid(pointwise(conv_out, act(pointwise(conv_in, torch.cat([visual, text], dim=-1)))))  # B, K, 2D
        b, k, d2 = g.shape
        if self.split == "per_token":
            return g[..., : d2 // 2], g[..., d2 // 2 :]
        g = g.reshape(b, 2 * k, d2 // 2)
        return g[:, :k], g[:, k:]

    def forward(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        gate_v, gate_t = self.gates(visual, text)
        return gate_v * visual + gate_t * text
