"""OFFSET's losses (docs/model.md#losses): batch-based classification and focus regularisation.

Both accept a gathered set of targets (``keys`` from every rank) so that in-batch negatives can span the
global batch; ``labels`` give the column of each query's own target.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_based_classification(query: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_BBC: cross-entropy over s * (q_i . k_j) with target j = labels[i]; ``scale`` s multiplies, no clamp."""
    return F.cross_entropy(scale * query @ keys.t(), labels)


def focus_teacher(target_tokens: torch.Tensor) -> torch.Tensor:
    """T_i = L2norm(flatten over tokens of L2norm(F_t,i,k)), [B, K, D] -> [B, K*D]."""
    return F.normalize(F.normalize(target_tokens, dim=-1).flatten(1), dim=-1)


def focus_regularisation(
    query: torch.Tensor, keys: torch.Tensor, teacher: torch.Tensor, teacher_all: torch.Tensor, tau: float
) -> torch.Tensor:
    """L_FR = KL(P || Q), batch mean: P_ij = softmax_j(T_i . T_j / tau) without gradient,
    Q_ij = softmax_j(q_i . k_j / tau)."""
    with torch.no_grad():
        p = (teacher @ teacher_all.t() / tau).softmax(dim=-1)
    log_q = (query @ keys.t() / tau).log_softmax(dim=-1)
    return F.kl_div(log_q, p, reduction="batchmean")
