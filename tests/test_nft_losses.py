"""DiffusionNFT's objective against a transcription of the official code on the same tensors
(NVlabs/DiffusionNFT scripts/train_nft_sd3.py, commit 24af555: lines 864-870 the forward process, 909-970 the loss,
169-189 the old policy's decay)."""

import pytest
import torch

from precise_lightning.modules.nft_losses import nft_loss, old_policy_decay, optimality


def _official(forward_prediction, old_prediction, ref_forward_prediction, x0, xt, t, advantages, beta, adv_clip_max,
              train_beta):
    """train_nft_sd3.py:909-970 transcribed (adv_mode "all": no extra clamp), names as there."""
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    advantages_clip = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    normalized_advantages_clip = (advantages_clip / adv_clip_max) / 2.0 + 0.5
    r = torch.clamp(normalized_advantages_clip, 0, 1)
    positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
    implicit_negative_prediction = (1.0 + beta) * old_prediction.detach() - beta * forward_prediction
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = (torch.abs(x0_prediction.double() - x0.double())
                         .mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001))
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (torch.abs(negative_x0_prediction.double() - x0.double())
                                  .mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001))
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    policy_loss = (ori_policy_loss * adv_clip_max).mean()
    loss = policy_loss
    kl_div_loss = ((forward_prediction - ref_forward_prediction) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    loss += train_beta * torch.mean(kl_div_loss)
    return loss


@pytest.mark.parametrize("beta,train_beta", [(1.0, 0.0001), (0.1, 0.0), (0.5, 0.01)])
def test_loss_and_gradient_equal_the_official_code(beta, train_beta):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.rand(6, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise  # train_nft_sd3.py:864-870
    v_old, v_ref = noise - x0 + 0.1 * torch.randn(x0.shape, generator=g), noise - x0
    advantages = torch.tensor([-7.0, -2.0, -0.3, 0.0, 1.5, 9.0])  # beyond the clip at both ends
    ours_v = (v_old + 0.05 * torch.randn(x0.shape, generator=g)).requires_grad_()
    theirs_v = ours_v.detach().clone().requires_grad_()
    ours = nft_loss(ours_v, v_old, x0, xt, t, advantages, beta, 5.0, v_ref=v_ref, kl_weight=train_beta)
    theirs = _official(theirs_v, v_old, v_ref, x0, xt, t, advantages, beta, 5.0, train_beta)
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-6, atol=1e-6)
    ours.loss.backward()
    theirs.backward()
    torch.testing.assert_close(ours_v.grad, theirs_v.grad, rtol=1e-6, atol=1e-9)
    assert ours_v.grad.abs().max() > 0


def test_optimality_maps_clipped_advantages_to_the_unit_interval():
    r = optimality(torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 10.0]), 5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def test_a_positive_sample_pulls_the_velocity_towards_its_target_a_negative_one_away():
    """One sample whose old velocity is off its flow-matching target: with r = 1 the gradient step moves v towards
    the target (eps - x0), with r = 0 away from it (paper: the negative policy is pushed to the bad data)."""
    x0, noise, t = torch.zeros(1, 4), torch.ones(1, 4), torch.tensor([0.5])
    xt = (1 - t) * x0 + t * noise
    target, v_old = noise - x0, noise - x0 + 0.3
    for advantage, towards in ((5.0, True), (-5.0, False)):
        v = v_old.clone().requires_grad_()
        nft_loss(v, v_old, x0, xt, t, torch.tensor([advantage]), 1.0, 5.0).loss.backward()
        moved = v_old - 0.01 * v.grad
        assert ((moved - target).abs().sum() < (v_old - target).abs().sum()) == towards


def test_old_policy_decay_is_the_official_schedule():
    """return_decay (train_nft_sd3.py:169-189) for its three decay types."""
    def official(step, decay_type):
        flat, uprate, uphold = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
        return 0.0 if step < flat else min((step - flat) * uprate, uphold)
    for decay_type, args in {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}.items():
        for step in (0, 1, 74, 75, 76, 200, 499, 500, 1000, 5000):
            assert old_policy_decay(step, *args) == official(step, decay_type)
