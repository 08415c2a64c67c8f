"""DiffusionNFT's objective (arXiv 2509.16117): a flow-matching loss on the forward process that pulls an implicit
positive policy towards well-rewarded samples and an implicit negative one towards the others, no log-probability
needed. Pure torch, as the official code computes it (NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py:909-970``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class NFTLossOutput:
    loss: Tensor  # scalar, with graph: the policy loss plus kl_weight x the KL term
    policy_loss: Tensor  # scalar, detached
    kl: Tensor  # scalar, detached: mean((v - v_ref)^2), 0 without a reference
    old_deviation: Tensor  # scalar, detached: mean((v - v_old)^2), how far training moved from the sampling policy


def optimality(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """The advantage [B] clipped to +-adv_clip_max and mapped to r in [0, 1] (0.5 at advantage 0; paper eq. 10,
    ``train_nft_sd3.py:909-929``)."""
    clipped = advantages.clamp(-adv_clip_max, adv_clip_max)
    return ((clipped / adv_clip_max) / 2.0 + 0.5).clamp(0, 1)


def _adaptive_x0_loss(x0_pred: Tensor, x0: Tensor) -> Tensor:
    """Per-sample mean((x0_pred - x0)^2) over the sample's mean |x0_pred - x0| (detached, in float64, at least
    1e-5): the adaptive weighting of ``train_nft_sd3.py:939-957``; [B, ...] -> [B]."""
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        weight = (x0_pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clip(min=0.00001)
    return ((x0_pred - x0) ** 2 / weight).mean(dim=dims)


def nft_loss(
    v: Tensor, v_old: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, advantages: Tensor, beta: float,
    adv_clip_max: float, v_ref: Tensor | None = None, kl_weight: float = 0.0,
) -> NFTLossOutput:
    """DiffusionNFT's loss at noised samples ``x_t = (1 - t) x0 + t eps`` [B, ...] of the rollouts' final latents
    ``x0``: the trained velocity ``v`` (with graph), the sampling (old) policy's ``v_old`` and the reference's
    ``v_ref`` (no graph), times ``t`` [B], advantages [B].

    Positive and implicit negative velocities ``v+ = beta v + (1 - beta) v_old``, ``v- = (1 + beta) v_old - beta v``
    (paper eq. 8); each gives x0 predictions ``x_t - t v+-`` scored by :func:`_adaptive_x0_loss`; the policy loss is
    ``mean((r L+ + (1 - r) L-) / beta) x adv_clip_max`` with r :func:`optimality`, plus ``kl_weight`` x
    ``mean((v - v_ref)^2)`` (``train_nft_sd3.py:934-970``).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (the positive policy's step from the old one), got {beta}")
    r = optimality(advantages, adv_clip_max)
    t = t.reshape(-1, *([1] * (x0.ndim - 1)))
    v_old = v_old.detach()
    positive = beta * v + (1 - beta) * v_old
    negative = (1.0 + beta) * v_old - beta * v
    positive_loss = _adaptive_x0_loss(x_t - t * positive, x0)
    negative_loss = _adaptive_x0_loss(x_t - t * negative, x0)
    policy_loss = ((r * positive_loss / beta + (1.0 - r) * negative_loss / beta) * adv_clip_max).mean()
    dims = tuple(range(1, x0.ndim))
    kl = ((v - v_ref) ** 2).mean(dim=dims).mean() if v_ref is not None else torch.zeros((), device=v.device)
    loss = policy_loss + kl_weight * kl if v_ref is not None else policy_loss
    return NFTLossOutput(loss, policy_loss.detach(), kl.detach(), ((v - v_old) ** 2).mean().detach())


def old_policy_decay(optimizer_steps: int, flat: int, rate: float, ceiling: float) -> float:
    """How much of the old (sampling) policy stays when it is pulled towards the trained one after a rollout's
    update, ``old <- d old + (1 - d) new``: 0 for the first ``flat`` optimizer steps, then rising by ``rate`` per
    step up to ``ceiling`` (``train_nft_sd3.py:169-189, 1035-1039``; the recipes' decay_type 1: 0, 0.001, 0.5;
    type 2: 75, 0.0075, 0.999; type 0: always 0, the old policy is the trained one)."""
    if optimizer_steps < flat:
        return 0.0
    return min((optimizer_steps - flat) * rate, ceiling)
