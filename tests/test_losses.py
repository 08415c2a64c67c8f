"""GRPO losses and advantages against hand-computed values and torch.distributions."""

import math

import pytest
import torch

from precise_lightning.modules.losses import (
    cps_log_ratio,
    flat_groups,
    group_advantages,
    grpo_guard_log_ratio,
    kl_penalty,
    kl_to_reference,
    ppo_policy_loss,
)


def test_flat_groups_counts_groups_whose_rewards_are_all_equal():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0, 5.0, 5.0, 5.0])
    groups = torch.tensor([7, 7, 3, 3, 9, 9, 2, 2, 2])
    assert flat_groups(rewards, groups) == 2  # groups 3 and 2
    assert flat_groups(torch.zeros(4), torch.tensor([0, 0, 1, 1])) == 2
    assert flat_groups(torch.arange(4.0), torch.tensor([0, 0, 1, 1])) == 0


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])
    groups = torch.tensor([7, 7, 3, 3, 9, 9])
    adv = group_advantages(rewards, groups, eps=1e-4)
    # group 7: mean 2, pop. std 1 -> -+1/1.0001; group 3: zero std -> 0 (no signal); group 9: mean 2, std 2
    a, b = 1 / 1.0001, 2 / 2.0001
    torch.testing.assert_close(adv, torch.tensor([-a, a, 0.0, 0.0, -b, b]))


def test_group_advantages_interleaved_groups_and_eps():
    rewards = torch.tensor([1.0, 10.0, 3.0, 20.0])
    groups = torch.tensor([0, 1, 0, 1])
    adv = group_advantages(rewards, groups, eps=1e-4)
    torch.testing.assert_close(adv, torch.tensor([-1 / 1.0001, -5 / 5.0001, 1 / 1.0001, 5 / 5.0001]))


def test_global_std_and_clipping():
    rewards = torch.tensor([1.0, 5.0, 3.0, 3.0])
    groups = torch.tensor([0, 0, 1, 1])
    # global: mean 3, deviations -2, 2, 0, 0 -> population std sqrt(8 / 4) = sqrt 2
    adv = group_advantages(rewards, groups, std_scope="global", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-math.sqrt(2), math.sqrt(2), 0.0, 0.0]))
    adv = group_advantages(rewards, groups, std_scope="global", eps=0.0, global_std=torch.tensor(0.1))
    torch.testing.assert_close(adv, torch.tensor([-5.0, 5.0, 0.0, 0.0]))  # +-20 clipped to +-5
    adv = group_advantages(rewards, groups, clip=0.5, eps=1e-4)
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5, 0.0, 0.0]))  # +-2/2.0001 clipped to +-0.5
    with pytest.raises(ValueError, match="std_scope must be"):
        group_advantages(rewards, groups, std_scope="batch")


def test_ppo_loss_hand_computed():
    # ratios e^0.2, e^-0.2, e^0.05, 1 with clip 0.1
    log_ratio = torch.tensor([0.2, -0.2, 0.05, 0.0], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -2.0, 3.0])
    out = ppo_policy_loss(log_ratio, adv, clip_range=0.1)
    r = [math.exp(0.2), math.exp(-0.2), math.exp(0.05), 1.0]
    # per sample: max(-A r, -A clip(r)): [-1.1, -e^-0.2, 2 e^0.05, -3]
    expected = (-1.1 - r[1] + 2 * r[2] - 3.0) / 4
    assert math.isclose(float(out.loss.detach()), expected, rel_tol=1e-6)
    assert float(out.clip_fraction) == 0.5  # |r - 1| > 0.1 for the first two
    assert math.isclose(float(out.approx_kl), 0.5 * (0.04 + 0.04 + 0.0025) / 4, rel_tol=1e-6)
    out.loss.backward()
    # clipped sample 0 has zero gradient; sample 1 (A > 0, r < 1-eps) keeps the unclipped gradient -A r / 4
    torch.testing.assert_close(log_ratio.grad, torch.tensor([0.0, -r[1] / 4, 2 * r[2] / 4, -3.0 / 4]))


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, mean_ref = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    std = torch.tensor(0.3)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std), torch.distributions.Normal(mean_ref, std))
    torch.testing.assert_close(kl_to_reference(mean, mean_ref, std), ref.mean(dim=(1, 2)))


def test_grpo_guard_ratio():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 5, generator=g)
    lp = torch.randn(3, generator=g)
    std = torch.tensor(0.2)
    assert torch.equal(grpo_guard_log_ratio(lp, lp, mean, mean, std), torch.zeros(3))
    shifted = mean + 0.1
    expected = (lp - (lp - 1.0) + 0.1**2 / (2 * 0.04)) * 0.2
    torch.testing.assert_close(grpo_guard_log_ratio(lp, lp - 1.0, shifted, mean, std), expected)


def test_kl_forms_hand_computed():
    """Each published KL on a hand-computed case: means differ by 0.3 everywhere, transition std 0.2, and (for
    flow_grpo) the sampler's d mean / d v equal to Flow-GRPO's own at eta 0.7, (1 + eta^2 / 2) dt."""
    mean, mean_ref, std = torch.full((2, 3, 4), 0.5), torch.full((2, 3, 4), 0.2), torch.tensor(0.2)
    exact = kl_penalty(mean, mean_ref, std, "exact", 0.6, 0.4, gain=-0.3)
    torch.testing.assert_close(exact, torch.full((2,), 0.09 / (2 * 0.04)))
    s_t2 = 0.7**2 * 0.6 / 0.4  # Flow-GRPO: std_dev_t = eta sqrt(t / (1 - t)) at t = 0.6, no sqrt(dt)
    own_gain = (1 + 0.7**2 / 2) * (0.4 - 0.6)
    torch.testing.assert_close(kl_penalty(mean, mean_ref, std, "flow_grpo", 0.6, 0.4, own_gain),
                               torch.full((2,), 0.09 / (2 * s_t2)))
    # another sampler moving its mean twice as much per unit velocity: the same velocity gap costs a quarter
    torch.testing.assert_close(kl_penalty(mean, mean_ref, std, "flow_grpo", 0.6, 0.4, 2 * own_gain),
                               torch.full((2,), 0.09 / (2 * s_t2) / 4))
    s_t2_at_one = 0.7**2 * 1.0 / (1 - 0.9)  # at t = 1 the grid's second point stands in the denominator
    # there its d mean / d v is dt (the score term's (1 - t) vanishes)
    torch.testing.assert_close(kl_penalty(mean, mean_ref, std, "flow_grpo", 1.0, 0.9, -0.1),
                               torch.full((2,), 0.09 / (2 * s_t2_at_one)))
    torch.testing.assert_close(kl_penalty(mean, mean_ref, std, "precise", 0.6, 0.4, -0.3), torch.full((2,), 0.09))
    with pytest.raises(ValueError, match="kl_form must be one of"):
        kl_penalty(mean, mean_ref, std, "reverse", 0.6, 0.4, -0.3)


def _flow_grpo_kl(x, v, v_ref, sigma, sigma_prev, sigma_max, noise_level=0.7):
    """Flow-GRPO's KL of one step, transcribed: sd3_sde_with_logprob.py:44-50 (its mean) and train_sd3.py:895."""
    dt = sigma_prev - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * noise_level

    def prev_sample_mean(model_output):
        return (x * (1 + std_dev_t**2 / (2 * sigma) * dt)
                + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt)

    return ((prev_sample_mean(v) - prev_sample_mean(v_ref)) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2)


def test_sd35_recipe_kl_per_velocity_difference_is_flow_grpos_at_every_trained_step():
    """The SD3.5 recipe trains with Precise (eta 1.5) at Flow-GRPO's beta 0.01: for the same v - v_ref its penalty is
    Flow-GRPO's (eta 0.7) within 1% on every trained step of its grid (without the velocity rescaling, 0.15-0.41x)."""
    from precise_lightning.sampling import SD3Grid, Sampler, transition, velocity_gain

    sampler = Sampler("precise", eta=1.5, num_steps=10, grid=SD3Grid(shift=3.0))
    times = sampler.timesteps.tolist()
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    v_ref = v + 0.1 * torch.randn(3, 4, 8, 8, generator=gen)
    for i in sampler.sde_steps:
        t, t_next = times[i], times[i + 1]
        mean, std = transition("precise", x, v, t, t_next, 1.5)
        mean_ref, _ = transition("precise", x, v_ref, t, t_next, 1.5)
        ours = kl_penalty(mean, mean_ref, std, "flow_grpo", t, t_next, velocity_gain("precise", t, t_next, 1.5))
        published = _flow_grpo_kl(x, v, v_ref, t, t_next, times[1])
        torch.testing.assert_close(ours, published, rtol=0.01, atol=0, msg=f"step {i}")


@pytest.mark.parametrize("per_sample_std", [False, True])
def test_cps_log_ratio_is_the_ratio_of_the_cps_codes_undivided_log_prob(per_sample_std):
    """FlowCPS sd3_sde_with_logprob.py:66-70: log_prob = -mean((x' - mean)^2), no 1/(2 std^2), no log std."""
    from precise_lightning.sampling import gaussian_log_prob

    gen = torch.Generator().manual_seed(3)
    x_next, mean, old_mean = (torch.randn(4, 2, 3, 3, generator=gen) for _ in range(3))
    std = torch.tensor([0.3, 0.1, 0.05, 0.2]).reshape(4, 1, 1, 1) if per_sample_std else torch.tensor(0.3)
    published = -((x_next - mean) ** 2).mean(dim=(1, 2, 3)) + ((x_next - old_mean) ** 2).mean(dim=(1, 2, 3))
    ours = cps_log_ratio(gaussian_log_prob(x_next, mean, std), gaussian_log_prob(x_next, old_mean, std), std)
    torch.testing.assert_close(ours, published, rtol=1e-5, atol=1e-6)


def test_unbiased_group_std_is_dancegrpos():
    """DanceGRPO train_grpo_flux.py:537-543: (r - group mean) / (group_rewards.std() + 1e-8), torch's unbiased std."""
    rewards = torch.tensor([0.2, 0.9, 0.4, 0.4, 1.0, 3.0, 2.5, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    published = torch.cat([(g - g.mean()) / (g.std() + 1e-8) for g in rewards.split(4)])
    ours = group_advantages(rewards, groups, eps=1e-8, unbiased=True)
    torch.testing.assert_close(ours, published)
    assert not torch.allclose(group_advantages(rewards, groups, eps=1e-8), published)  # the population std differs
    flat = group_advantages(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0, 0, 1]), eps=1e-8, unbiased=True)
    assert torch.equal(flat, torch.zeros(3))  # a flat group and a group of one: no signal, no NaN


def _precise_stat_tracker(prompts, rewards, sentinel=-10.0):
    """The Precise code's PerPromptStatTracker.update (core/stat_tracking.py:11-49, type grpo, per-prompt std),
    transcribed."""
    import numpy as np

    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    advantages = np.zeros_like(rewards)
    valid = rewards != sentinel
    for prompt in np.unique(prompts):
        idx = prompts == prompt
        kept = rewards[idx][valid[idx]]
        if len(kept) == 0:
            continue
        adv = (rewards[idx] - kept.mean()) / (kept.std() + 1e-4)
        adv[~valid[idx]] = 0.0
        advantages[idx] = adv
    return advantages


def test_unscored_images_get_advantage_zero_and_leave_their_groups_statistics():
    rewards = torch.tensor([0.2, 0.9, math.nan, 0.4, 1.0, 3.0, 2.5, 0.5, math.nan, math.nan])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    valid = ~rewards.isnan()
    ours = group_advantages(rewards, groups, valid=valid)
    sentinel = torch.where(valid, rewards, -10.0)
    published = _precise_stat_tracker(groups.tolist(), sentinel.tolist())
    torch.testing.assert_close(ours, torch.tensor(published, dtype=torch.float32))
    assert ours[2] == 0 and ours[8] == 0 and ours[9] == 0 and torch.isfinite(ours).all()
    assert not torch.allclose(ours[:4], group_advantages(torch.where(valid, rewards, 0.0), groups)[:4])
