"""Rollout loop and Sampler: ratio exactly 1 on re-scoring, bit-exact per-step seeding, SDE windows, validation."""

import pytest
import torch

from precise_lightning.sampling import RULES, LinearGrid, PerSample, Sampler, SD3Grid, rollout, seeded_generators, transition

STOCHASTIC = sorted(set(RULES) - {"ode"})


class Linear(torch.nn.Module):
    """A small velocity network v = tanh(W x + b t); deterministic on CPU."""

    def __init__(self, dim=6):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(dim, dim)
        self.time = torch.nn.Parameter(torch.randn(dim))

    def forward(self, x, t):
        return torch.tanh(self.lin(x.flatten(1)) + t * self.time).view_as(x)


@pytest.mark.parametrize("rule", STOCHASTIC)
def test_rescored_rollout_has_ratio_exactly_one(rule):
    net = Linear()
    sampler = Sampler(rule, num_steps=6, grid=SD3Grid())
    noise = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(1))
    traj = sampler.sample(net, noise, generator=torch.Generator().manual_seed(2), keep_means=True)
    assert traj.log_probs.shape == (4, 5) and traj.latents.shape == (7, 4, 2, 3)
    times = sampler.timesteps.to(noise.dtype)
    for k, i in enumerate(traj.sde_steps):
        x, x_next = traj.latents[i], traj.latents[i + 1]
        d_prev = traj.d_prev[k] if traj.d_prev is not None else None  # multistep rules: the x0_hat it read
        out = sampler.score(i, x, net(x, times[i]), x_next, d_prev)
        assert torch.equal(out.log_prob, traj.log_probs[:, k])
        assert torch.equal(out.mean, traj.means[k])
        assert torch.equal(torch.exp(out.log_prob - traj.log_probs[:, k]), torch.ones(4))


def test_per_step_seeding_is_bit_exact_and_step_local():
    net = Linear()
    sampler = Sampler("precise", num_steps=5)
    noise = torch.randn(3, 6)
    a = sampler.sample(net, noise, generator=seeded_generators(7, 5))
    b = sampler.sample(net, noise, generator=seeded_generators(7, 5))
    c = sampler.sample(net, noise, generator=seeded_generators(8, 5))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents[-1], c.latents[-1])
    # A step's noise depends only on its own generator: replaying step 2 alone reproduces it.
    t = sampler.timesteps.float()
    mean, std = transition("precise", a.latents[2], net(a.latents[2], t[2]), t[2], t[3])
    z = torch.randn(3, 6, generator=seeded_generators(7, 5)[2])
    assert torch.equal(mean + std * z, a.latents[3])


def test_per_sample_generators_make_rows_independent_of_the_batch_split():
    """Row i's noise comes from generator i: rolling out rows [0, 2) and [2, 5) apart gives the whole batch's rows."""
    net, noise = Linear(), torch.randn(5, 6)
    sampler = Sampler("precise", num_steps=4)

    def generators():
        return PerSample([torch.Generator().manual_seed(100 + i) for i in range(5)])

    whole = sampler.sample(net, noise, generator=generators())
    parts = [sampler.sample(net, noise[s], generator=generators()[s]) for s in (slice(0, 2), slice(2, 5))]
    torch.testing.assert_close(torch.cat([p.latents for p in parts], 1), whole.latents, rtol=0, atol=1e-6)
    t = sampler.timesteps.float()
    mean, std = transition("precise", whole.latents[1], net(whole.latents[1], t[1]), t[1], t[2])
    g = torch.Generator().manual_seed(103)
    torch.randn(6, generator=g)  # step 0 drew row 3's first noise
    torch.testing.assert_close(mean[3] + std * torch.randn(6, generator=g), whole.latents[2, 3], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="5 per-sample generators for a batch of 2"):
        sampler.sample(net, noise[:2], generator=generators())


def test_single_generator_reproduces_and_wrong_count_is_rejected():
    net, noise = Linear(), torch.randn(2, 6)
    sampler = Sampler("cps", num_steps=4)
    a = sampler.sample(net, noise, generator=torch.Generator().manual_seed(0))
    b = sampler.sample(net, noise, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(ValueError, match="got 3 generators for 4 steps"):
        sampler.sample(net, noise, generator=seeded_generators(0, 3))


def test_last_step_is_deterministic_x0_hat():
    net, noise = Linear(), torch.randn(2, 6)
    traj = Sampler("flow_sde", num_steps=4).sample(net, noise)
    t = torch.tensor(0.25)
    x = traj.latents[-2]
    torch.testing.assert_close(traj.latents[-1], x - t * net(x, t))
    assert traj.sde_steps == [0, 1, 2]


def test_sde_window_is_ode_outside():
    net, noise = Linear(), torch.randn(2, 6)
    window = Sampler("precise", num_steps=8, sde_window=(2, 5))
    ode = Sampler("ode", num_steps=8)
    a = window.sample(net, noise, generator=torch.Generator().manual_seed(0))
    b = ode.sample(net, noise)
    assert a.sde_steps == [2, 3, 4] and a.log_probs.shape == (2, 3) and b.log_probs.shape == (2, 0)
    assert torch.equal(a.latents[:3], b.latents[:3])  # identical until the window opens
    assert not torch.allclose(a.latents[5], b.latents[5])
    # after the window, steps are Euler steps again
    t = window.timesteps.float()
    for i in range(5, 8):
        x = a.latents[i]
        torch.testing.assert_close(a.latents[i + 1], x + (t[i + 1] - t[i]) * net(x, t[i]))


def test_sliding_window_moves_by_stride_every_interval_and_starts_over():
    """MixGRPO's progressive window: size kept, moved by the stride every `window_shift_every` rollouts, back to
    its first position once it would pass the last stochastic step (N = 8: steps 0..6 may be stochastic)."""
    s = Sampler("precise", num_steps=8, sde_window=(1, 4), window_shift_every=3, window_stride=2)
    starts = [s.sde_steps_at(k)[0] for k in range(15)]
    assert starts == [1, 1, 1, 3, 3, 3, 1, 1, 1, 3, 3, 3, 1, 1, 1]  # 1 -> 3; 5 would end at 8 > 7: start over
    assert all(len(s.sde_steps_at(k)) == 3 for k in range(15)) and s.sde_steps == [1, 2, 3]
    unit = Sampler("precise", num_steps=8, sde_window=(0, 4), window_shift_every=1)
    assert [unit.sde_steps_at(k) for k in (0, 3, 4)] == [[0, 1, 2, 3], [3, 4, 5, 6], [0, 1, 2, 3]]
    traj = unit.sample(Linear(), torch.randn(2, 6), rollout_index=2)
    assert traj.sde_steps == [2, 3, 4, 5] and traj.log_probs.shape == (2, 4)
    assert Sampler("precise", num_steps=8, sde_window=(2, 5)).sde_steps_at(7) == [2, 3, 4]  # fixed without it


def test_rollout_function_rejects_stochastic_last_step():
    with pytest.raises(ValueError, match="last step is deterministic"):
        rollout(Linear(), torch.randn(1, 6), LinearGrid()(4), "precise", sde_steps=[3])


def test_sampler_defaults_are_the_published_noise_levels():
    """Precise's code: precise 1.5, dance_* 0.3, every other rule 0.7 (config/flux2_klein.py, _default_noise_level)."""
    s = Sampler()
    assert (s.rule, s.eta, s.num_steps) == ("precise", 1.5, 10)
    assert {r: Sampler(r).eta for r in ("flow_sde", "cps", "dance_sde", "dance_precise")} == {
        "flow_sde": 0.7, "cps": 0.7, "dance_sde": 0.3, "dance_precise": 0.3}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(rule="ddim"), r"unknown step rule 'ddim'; choose one of \['cps', 'dance_precise'"),
        (dict(eta=-0.5), "eta must be a finite number >= 0"),
        (dict(num_steps=1), "num_steps must be an integer >= 2"),
        (dict(num_steps=10, sde_window=(3, 10)), r"sde_window \[3, 10\] must satisfy 0 <= start < stop <= 9"),
        (dict(sde_window=(4, 4)), "must satisfy"),
        (dict(rule="ode", sde_window=(0, 2)), "rule 'ode' has no stochastic steps"),
        (dict(log_prob_reduce="max"), "log_prob_reduce must be"),
        (dict(window_shift_every=5), "window_shift_every slides the sde_window: give an initial sde_window"),
        (dict(sde_window=(0, 2), window_shift_every=0), r"window_shift_every \(0\) and window_stride \(1\) must"),
    ],
)
def test_sampler_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampler(**kwargs)
