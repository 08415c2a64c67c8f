"""GRPO math: group advantages, the PPO-clipped surrogate, the KL penalty and ratio diagnostics. Pure torch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from precise_lightning.sampling.rules import reduce_elements, velocity_gain


def group_advantages(
    rewards: Tensor, group_ids: Tensor, std_scope: str = "group", clip: float = 5.0, eps: float = 1e-4,
    global_std: Tensor | None = None, unbiased: bool = False, valid: Tensor | None = None,
) -> Tensor:
    """(r - group mean) / (std + eps), clipped to +-clip (DanceGRPO / Flow-GRPO); rewards, group_ids: [B] -> [B].

    ``std_scope="group"`` divides by each group's std; ``"global"`` by the std of all rewards (``global_std``
    when the caller gathered them across ranks, else the std of ``rewards``). The std is the population one
    (Flow-GRPO's and the Precise code's ``np.std``, eps 1e-4) or with ``unbiased`` Bessel's (DanceGRPO's
    ``torch.std``, eps 1e-8). A group whose rewards are all equal gets advantage 0: it carries no signal.
    Rows where ``valid`` [B] is False (a reward gave no score) get advantage 0 and leave their group's mean and
    std, as the Precise code's sentinel (``stat_tracking.py:17-49``).
    """
    if std_scope not in ("group", "global"):
        raise ValueError(f"std_scope must be 'group' or 'global', got {std_scope!r}")
    weight = torch.ones_like(rewards, dtype=torch.float32) if valid is None else valid.float()
    rewards = torch.where(weight > 0, rewards.float(), 0.0)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    groups = int(inverse.max()) + 1 if len(inverse) else 0
    counts = torch.zeros(groups, device=rewards.device).index_add_(0, inverse, weight)
    sums = torch.zeros(groups, device=rewards.device).index_add_(0, inverse, rewards)
    mean = (sums / counts.clamp_min(1))[inverse]
    centred = (rewards - mean) * weight
    if std_scope == "group":
        dof = (counts - 1 if unbiased else counts).clamp_min(1)  # a group of one: centred 0, advantage 0
        var = torch.zeros(groups, device=rewards.device).index_add_(0, inverse, centred**2) / dof
        std = var.sqrt()[inverse]
    else:
        std = global_std.float() if global_std is not None else rewards[weight > 0].std(unbiased=unbiased)
    return (centred / (std + eps)).clamp(-clip, clip)


def flat_groups(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Number of groups whose rewards are all equal (their advantages are 0: no signal); [B], [B] -> 0-d float."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    first = rewards.new_zeros(int(inverse.max()) + 1).scatter_(0, inverse, rewards)  # one member's reward per group
    differing = torch.unique(inverse[rewards != first[inverse]]).numel()
    return torch.tensor(float(len(first) - differing), device=rewards.device)


@dataclass
class PolicyLossOutput:
    loss: Tensor  # scalar PPO-clipped policy loss, with graph
    ratio: Tensor  # [B], detached
    clip_fraction: Tensor  # scalar
    approx_kl: Tensor  # scalar, 0.5 E[(lp - lp_old)^2]


def kl_to_reference(mean: Tensor, mean_ref: Tensor, std: Tensor) -> Tensor:
    """Per-sample KL between N(mean, std^2) and N(mean_ref, std^2), averaged over elements like the log-prob: [B]."""
    return reduce_elements(((mean - mean_ref) ** 2).float() / (2 * std.float() ** 2))


KL_FORMS = ("exact", "flow_grpo", "precise")


def kl_penalty(
    mean: Tensor, mean_ref: Tensor, std: Tensor, form: str, t: float, t_next: float, gain: float,
    flow_grpo_eta: float = 0.7,
) -> Tensor:
    """The KL term [B] of one step ``t -> t'`` between the policy's and the reference's transition means [B, ...];
    ``gain`` is the sampler's d mean / d v there, so ``(mean - mean_ref) / gain`` is the velocity difference.

    - ``exact``: the KL of the two Gaussian transitions, ``mean((mean - mean_ref)^2) / (2 std^2)`` (mean over elements).
    - ``flow_grpo``: Flow-GRPO's penalty for the same velocity difference, whatever the sampler: its KL
      (``train_sd3.py:895``) ``mean((m - m_ref)^2) / (2 s_t^2)`` of its own SDE's means at ``flow_grpo_eta``
      (``sd3_sde_with_logprob.py:47-50``: ``m - m_ref = c (v - v_ref)`` with ``c`` its d mean / d v and
      ``s_t = eta sqrt(t / (1 - t))``, the grid's second point standing for t in ``1 - t`` at t = 1). Under its
      sampler at its eta (flow_sde, 0.7) this is its KL exactly; under another, beta means what it means there.
    - ``precise``: the Precise code's ``mean((mean - mean_ref)^2)``, no division (``rl_trainer.py:901-904``).
    """
    if form == "exact":
        return kl_to_reference(mean, mean_ref, std)
    sq = reduce_elements(((mean - mean_ref) ** 2).float())
    if form == "flow_grpo":
        c = velocity_gain("flow_sde", t, t_next, flow_grpo_eta)  # its t_at_one default: the grid's second point
        s2 = flow_grpo_eta**2 * t / (1 - (t_next if t == 1 else t))
        return sq * (c / gain) ** 2 / (2 * s2)
    if form == "precise":
        return sq
    raise ValueError(f"kl_form must be one of {list(KL_FORMS)}, got {form!r}")


def grpo_guard_log_ratio(log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor) -> Tensor:
    """GRPO-Guard ratio normalisation: (lp - lp_old + ||mean - mean_old||^2 / (2 std^2)) * std, per sample [B]."""
    shift = kl_to_reference(mean, old_mean, std)
    std_per_sample = std.float().expand_as(mean).reshape(len(mean), -1)[:, 0]
    return (log_prob - old_log_prob + shift) * std_per_sample


LOG_PROB_FORMS = ("gaussian", "cps")


def cps_log_ratio(log_prob: Tensor, old_log_prob: Tensor, std: Tensor) -> Tensor:
    """The CPS code's log-ratio [B] from Gaussian log-probs [B]: its log-prob is ``-mean((x' - mean)^2)``, without
    ``1 / (2 std^2)`` or ``log std`` (FlowCPS ``sd3_sde_with_logprob.py:66-70``), which is ``2 std^2`` times the
    Gaussian one plus a constant, so its ratio is ``exp(2 std^2 (lp - lp_old))``."""
    std = std.float().reshape(-1)  # a step's std is one number per step (0-d) or per sample ([B, 1, ...])
    return 2 * std**2 * (log_prob - old_log_prob)


def ppo_policy_loss(log_ratio: Tensor, advantages: Tensor, clip_range: float) -> PolicyLossOutput:
    """PPO-clipped surrogate (arXiv 1707.06347 eq. 7) on per-sample log-ratios [B] and advantages [B]."""
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean()
        approx_kl = 0.5 * (log_ratio**2).mean()
    return PolicyLossOutput(loss=loss, ratio=ratio.detach(), clip_fraction=clip_fraction, approx_kl=approx_kl)
