"""Losses as pure tensor functions: tensors in, loss out. No modules, no state."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def contrastive_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: (N, D) L2-normalised; queue: (K, D). Returns l_pos (N,) and l_neg (N, K)."""
    return (q * k).sum(dim=1), q @ queue.t()


def margin_nce_loss(l_pos: torch.Tensor, l_neg: torch.Tensor, margin: float, temperature: float) -> torch.Tensor:
    """The paper's margin loss: cross-entropy of ``[l_pos - m, l_neg] / tau`` to index 0.

    ``margin = 0`` is exactly MoCo's InfoNCE.
    """
    logits = torch.cat([(l_pos - margin).unsqueeze(1), l_neg], dim=1) / temperature
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), target)


def ofd_margins(bn_weight: torch.Tensor, bn_bias: torch.Tensor) -> torch.Tensor:
    """Per-channel margin of OFD's margin ReLU: E[x | x < 0] for x ~ N(beta, gamma^2).

    ``m = beta - gamma * pdf(beta/gamma) / cdf(-beta/gamma)``; where ``cdf(-beta/gamma) <= 1e-3``
    the expectation is numerically unstable and ``-3 * gamma`` is used instead.
    """
    gamma = bn_weight.detach().abs().double().clamp_min(1e-12)
    beta = bn_bias.detach().double()
    z = beta / gamma
    normal = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z))
    cdf_neg = normal.cdf(-z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    margin = torch.where(cdf_neg > 1e-3, beta - gamma * pdf / cdf_neg.clamp_min(1e-3), -3 * gamma)
    return margin.to(bn_weight.dtype)


def partial_l2(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Element-wise ``(s - t)^2``, zero where ``s <= t`` and ``t <= 0`` (OFD's partial L2)."""
    mask = ~((student <= target) & (target <= 0))
    return (student - target).pow(2) * mask


STAGE_WEIGHTS = (1 / 8, 1 / 4, 1 / 2, 1.0)


def ofd_distill_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor],
                     margins: list[torch.Tensor], stage_weights=STAGE_WEIGHTS) -> torch.Tensor:
    """Sum over stages of ``w_i * partial_l2(s_i, max(t_i, m_i))``, summed over elements / batch.

    ``student_feats`` are the connector outputs, ``teacher_feats`` the teacher's pre-ReLU stage
    outputs, ``margins`` one (C,) tensor per stage.
    """
    batch = student_feats[0].shape[0]
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for s, t, m, w in zip(student_feats, teacher_feats, margins, stage_weights):
        target = torch.max(t.float(), m.float().view(1, -1, 1, 1))
        total = total + w * partial_l2(s.float(), target).sum()
    return total / batch
