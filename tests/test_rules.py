"""Step rules against closed forms: Euler limit, DDPM posterior, marginal preservation, fine-step SDE limit."""

import math

import pytest
import torch

from precise_lightning.sampling import DEFAULT_ETA, RULES, gaussian_log_prob, transition

MEAN_FORM = ["cps", "precise", "dance_precise"]
STEPS = [(1.0, 0.9), (0.9, 0.7), (0.6, 0.55), (0.3, 0.1), (0.2, 0.0)]


def _xv(shape=(4, 3, 5, 5), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("t,t_next", STEPS)
def test_eta_zero_is_euler(rule, t, t_next):
    x, v = _xv()
    mean, std = transition(rule, x, v, t, t_next, eta=0.0)
    torch.testing.assert_close(mean, x + (t_next - t) * v, rtol=0, atol=1e-12)
    assert float(std.abs().max()) == 0.0


@pytest.mark.parametrize("t,t_next", STEPS[1:4])
def test_precise_sqrt2_is_ddpm_posterior(t, t_next):
    """eta = sqrt 2 equals q(x_t' | x_t, x0 = x0_hat), computed here by Gaussian conditioning of the forward chain."""
    x, v = _xv()
    x0 = x - t * v
    a, s, a2, s2 = 1 - t, t, 1 - t_next, t_next
    cov = (a / a2) * s2**2  # Cov(x_t, x_t') under x_t = (a/a') x_t' + independent noise
    cond_mean = a2 * x0 + cov / s**2 * (x - a * x0)
    cond_var = s2**2 - cov**2 / s**2
    mean, std = transition("precise", x, v, t, t_next, eta=math.sqrt(2))
    torch.testing.assert_close(mean, cond_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(std**2, torch.tensor(cond_var, dtype=torch.float64), rtol=1e-10, atol=1e-14)
    r = t_next * (1 - t) / (t * (1 - t_next))
    torch.testing.assert_close(std**2, torch.tensor(t_next**2 * (1 - r**2), dtype=torch.float64))


def _marginal_var(rule, t, t_next, eta, x0):
    """Variance of x' when x = (1-t) x0 + t eps and x0_hat = x0: the mean is affine in eps, so probe eps = 0, 1."""
    ones = torch.ones_like(x0)
    eps = torch.stack([torch.zeros_like(x0), ones])
    x = (1 - t) * x0 + t * eps
    v = eps - x0  # the exact velocity for point-mass data
    mean, std = transition(rule, x, v, t, t_next, eta)
    coef = mean[1] - mean[0]
    return mean[0], coef**2 + std**2


@pytest.mark.parametrize("rule", MEAN_FORM)
@pytest.mark.parametrize("t,t_next", STEPS)
@pytest.mark.parametrize("eta_scale", [0.5, 1.0, 2.0])
def test_point_mass_marginal_preserved(rule, t, t_next, eta_scale):
    eta = min(DEFAULT_ETA[rule] * eta_scale, 1.0) if rule == "cps" else DEFAULT_ETA[rule] * eta_scale
    x0 = torch.randn(1, 6, dtype=torch.float64)
    mean_at_eps0, var = _marginal_var(rule, t, t_next, eta, x0)
    torch.testing.assert_close(mean_at_eps0, (1 - t_next) * x0)
    torch.testing.assert_close(var, torch.full_like(var, t_next**2), rtol=1e-10, atol=1e-14)


def test_point_mass_monte_carlo_precise():
    g = torch.Generator().manual_seed(1)
    t, t_next, n = 0.8, 0.5, 200_000
    x0 = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = (1 - t) * x0 + t * eps
    mean, std = transition("precise", x, eps - x0, t, t_next)
    x_next = mean + std * torch.randn(n, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(x_next.mean(0), (1 - t_next) * x0[0], atol=5e-3, rtol=0)
    torch.testing.assert_close(x_next.var(0), torch.full((2,), t_next**2, dtype=torch.float64), atol=5e-3, rtol=0)


@pytest.mark.parametrize("t,t_next", [(0.9, 0.6), (0.5, 0.2)])
def test_flow_sde_adds_excess_variance_that_vanishes_with_step(t, t_next):
    """Euler-Maruyama overshoots the marginal variance by O(dt^2): the motivation for Precise."""
    x0 = torch.randn(1, 3, dtype=torch.float64)
    _, var = _marginal_var("flow_sde", t, t_next, 0.7, x0)
    _, var_half = _marginal_var("flow_sde", t, (t + t_next) / 2, 0.7, x0)
    excess = float(var.mean() - t_next**2)
    excess_half = float(var_half.mean() - ((t + t_next) / 2) ** 2)
    assert excess > 0 and excess_half > 0
    assert excess_half < excess / 3  # ~ quarter for halved dt


def _frozen_sde_moments(x, x0_hat, t, t_next, g2, substeps):
    """Exact mean/variance of many Euler-Maruyama sub-steps of the frozen-x0_hat reverse SDE (linear in x)."""
    u = torch.linspace(t, t_next, substeps + 1, dtype=torch.float64)
    m, var = x.clone(), torch.zeros_like(x)
    for k in range(substeps):
        uk, du = float(u[k]), float(u[k + 1] - u[k])
        gk = g2(uk)
        # drift = (x - x0h)/u + g^2/(2u^2) (x - (1-u) x0h) = a x + b
        a = 1 / uk + gk / (2 * uk**2)
        b = -x0_hat / uk - gk * (1 - uk) / (2 * uk**2) * x0_hat
        m = m + (a * m + b) * du
        var = (1 + a * du) ** 2 * var + gk * (-du)
    return m, var


@pytest.mark.parametrize(
    "rule,eta,g2",
    [
        ("precise", 1.5, lambda u: 1.5**2 * u / (1 - u)),
        ("precise", 0.7, lambda u: 0.7**2 * u / (1 - u)),
        ("dance_precise", 0.3, lambda u: 0.3**2),
    ],
)
def test_fine_euler_maruyama_converges_to_closed_form(rule, eta, g2):
    x, v = _xv(shape=(2, 4))
    t, t_next = 0.85, 0.45
    x0_hat = x - t * v
    mean, std = transition(rule, x, v, t, t_next, eta)
    errors = []
    for substeps in (500, 4000):
        m, var = _frozen_sde_moments(x, x0_hat, t, t_next, g2, substeps)
        errors.append(((m - mean).abs().max().item(), (var - std**2).abs().max().item()))
    assert errors[1][0] < 2e-3 and errors[1][1] < 2e-3
    assert errors[1][0] < errors[0][0] / 4 and errors[1][1] < errors[0][1] / 4  # first-order convergence


def test_first_and_last_step():
    x, v = _xv()
    mean, std = transition("precise", x, v, 1.0, 0.8)
    torch.testing.assert_close(mean, 0.2 * (x - v))  # r = 0: x0_hat kept, the noise fully resampled
    torch.testing.assert_close(std, torch.tensor(0.8, dtype=torch.float64))
    for rule in MEAN_FORM:
        mean, std = transition(rule, x, v, 0.3, 0.0)
        torch.testing.assert_close(mean, x - 0.3 * v)
        assert float(std) == 0.0


def test_flow_sde_matches_flow_grpo_expanded_form():
    x, v = _xv()
    sigmas = [1.0, 0.9, 0.6]
    for t, t_next in zip(sigmas[:-1], sigmas[1:]):
        std_t = math.sqrt(t / (1 - (sigmas[1] if t == 1 else t))) * 0.7
        dt = t_next - t
        ref_mean = x * (1 + std_t**2 / (2 * t) * dt) + v * (1 + std_t**2 * (1 - t) / (2 * t)) * dt
        mean, std = transition("flow_sde", x, v, t, t_next, 0.7)
        torch.testing.assert_close(mean, ref_mean)
        torch.testing.assert_close(std, torch.tensor(std_t * math.sqrt(-dt), dtype=torch.float64))
    mean_ctx, _ = transition("flow_sde", x, v, 1.0, 0.9, 0.7, t_at_one=0.95)
    assert not torch.allclose(mean_ctx, transition("flow_sde", x, v, 1.0, 0.9, 0.7)[0])


@pytest.mark.parametrize("t,t_next", [(0.9, 0.7), (0.5, 0.4), (0.3, 0.1)])
def test_dance_sde_is_euler_maruyama_of_the_reverse_sde_with_the_exact_score(t, t_next):
    """Gaussian data x0 ~ N(m, s^2): the exact velocity E[eps - x0 | x_t] comes from Gaussian conditioning and the
    exact score from torch.distributions by autograd. DanceGRPO's step must be one Euler-Maruyama step of the
    reverse SDE dx = [v - eta^2/2 score] dt + eta dW (dt = t' - t < 0)."""
    m, s, eta = 0.4, 0.6, 0.3
    x = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64).requires_grad_(True)
    var = (1 - t) ** 2 * s**2 + t**2  # x_t = (1 - t) x0 + t eps
    law = torch.distributions.Normal(torch.tensor((1 - t) * m, dtype=x.dtype), torch.tensor(var, dtype=x.dtype).sqrt())
    score = torch.autograd.grad(law.log_prob(x).sum(), x)[0]
    x = x.detach()
    centred = x - (1 - t) * m
    v = t / var * centred - (m + (1 - t) * s**2 / var * centred)  # E[eps | x_t] - E[x0 | x_t]
    mean, std = transition("dance_sde", x, v, t, t_next, eta)
    torch.testing.assert_close(mean, x + (t_next - t) * (v - eta**2 / 2 * score), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std, torch.tensor(eta * math.sqrt(t - t_next), dtype=torch.float64))


def test_cps_renoises_fixed_fraction():
    x, v = _xv()
    for t, t_next in STEPS[:4]:
        _, std = transition("cps", x, v, t, t_next, 0.7)
        torch.testing.assert_close(std, torch.tensor(t_next * math.sin(0.35 * math.pi), dtype=torch.float64))
    mean, std = transition("cps", x, v, 0.7, 0.5, 1.0)
    torch.testing.assert_close(mean, 0.5 * (x - 0.7 * v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3,), (3, 7), (3, 2, 4, 4)])
def test_shapes_dtypes_and_per_sample_times(rule, dtype, shape):
    x, v = _xv(shape, dtype)
    t = torch.tensor([0.9, 0.6, 0.3], dtype=dtype)
    t_next = torch.tensor([0.8, 0.5, 0.0], dtype=dtype)
    mean, std = transition(rule, x, v, t, t_next)
    assert mean.shape == x.shape and mean.dtype == dtype and std.dtype == dtype
    assert torch.broadcast_shapes(std.shape, mean.shape) == mean.shape
    for b in range(3):
        mb, sb = transition(rule, x[b : b + 1], v[b : b + 1], float(t[b]), float(t_next[b]))
        torch.testing.assert_close(mean[b : b + 1], mb)
        torch.testing.assert_close(std.expand_as(mean)[b], sb.expand_as(mb)[0])
    lp = gaussian_log_prob(mean + std, mean, std)
    assert lp.shape == (3,) and lp.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("per_sample_std", [False, True])
def test_log_prob_matches_torch_distributions(dtype, per_sample_std):
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(5, 3, 4, generator=g).to(dtype)
    x = torch.randn(5, 3, 4, generator=g).to(dtype)
    std = torch.rand(5, 1, 1, generator=g) + 0.1 if per_sample_std else torch.tensor(0.37)
    std = std.to(dtype)
    ref = torch.distributions.Normal(mean.double(), std.double()).log_prob(x.double())
    lp_mean = gaussian_log_prob(x, mean, std)
    lp_sum = gaussian_log_prob(x, mean, std, reduce="sum")
    assert lp_mean.dtype == lp_sum.dtype == torch.float32  # whatever the input precision
    # float64 inputs are computed in float64, so only the final float32 rounding remains
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype != torch.float64 else {"rtol": 2e-7, "atol": 1e-7}
    torch.testing.assert_close(lp_mean.double(), ref.mean(dim=(1, 2)), **tol)
    torch.testing.assert_close(lp_sum.double(), ref.sum(dim=(1, 2)), rtol=tol["rtol"], atol=tol["atol"] * 12)


def test_bad_arguments_are_rejected():
    x, v = _xv()
    with pytest.raises(ValueError, match="unknown step rule 'euler'.*precise"):
        transition("euler", x, v, 0.5, 0.4)
    with pytest.raises(ValueError, match="eta must be"):
        transition("precise", x, v, 0.5, 0.4, eta=-1.0)
    with pytest.raises(ValueError, match="cps needs eta in"):
        transition("cps", x, v, 0.5, 0.4, eta=1.5)
    with pytest.raises(ValueError, match="1 >= t > t_next >= 0"):
        transition("precise", x, v, 0.4, 0.5)
    with pytest.raises(ValueError, match="reduce must be"):
        gaussian_log_prob(x, x, 1.0, reduce="max")


def _precise_code_step(x, v, sigma, next_sigma, sigma_max, eta, sde_type):
    """The Precise code's transition, transcribed: compute_std_dev_t (sde_with_logprob.py:53-83, std clamped to
    1e-6) and the mean (sde_with_logprob.py:157-168)."""
    dt = next_sigma - sigma
    if sde_type == "dance_grpo":
        std = eta * math.sqrt(-dt)
    elif sde_type == "flow_grpo":
        std = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * eta * math.sqrt(-dt)
    elif sde_type == "cps":
        std = next_sigma * math.sin(eta * math.pi / 2)
    elif sde_type == "precise":
        ratio = (next_sigma * (1 - sigma)) / (sigma * (1 - next_sigma))
        std = next_sigma * math.sqrt(1 - ratio ** (eta**2))
    std = max(std, 1e-6)
    x0 = x - sigma * v
    if sde_type in ("flow_grpo", "dance_grpo"):
        score = -(x - x0 * (1 - sigma)) / sigma**2
        return x + dt * v + 0.5 * std**2 * score, std
    return x0 * (1 - next_sigma) + (x + v * (1 - sigma)) * math.sqrt(max(next_sigma**2 - std**2, 0)), std


@pytest.mark.parametrize("rule,sde_type,eta", [("flow_sde", "flow_grpo", 0.7), ("dance_sde", "dance_grpo", 0.3),
                                               ("cps", "cps", 0.7), ("precise", "precise", 1.5)])
def test_rules_equal_the_precise_codes_on_the_klein_grid_last_step_included(rule, sde_type, eta):
    """Every step of the Klein recipe's grid (20 steps at 1024 latent tokens), the last one too: the Precise code
    samples it with its rule (flow_grpo std 0.21, dance_grpo 0.15 from t 0.263), which ``stochastic_last_step``
    reproduces; where our std is 0 its clamp leaves 1e-6."""
    from precise_lightning.sampling import Flux2Grid, Sampler

    sampler = Sampler(rule, eta=eta, num_steps=20, grid=Flux2Grid(1024), stochastic_last_step=True)
    times = sampler.timesteps.tolist()
    x, v = _xv()
    for i in range(20):
        mean, std = transition(rule, x, v, times[i], times[i + 1], eta)
        ref_mean, ref_std = _precise_code_step(x, v, times[i], times[i + 1], times[1], eta, sde_type)
        torch.testing.assert_close(mean, ref_mean, msg=f"step {i}")
        assert float(std) == pytest.approx(ref_std, rel=1e-9, abs=1.1e-6), i
    last_std = {"flow_sde": 0.215, "dance_sde": 0.154}.get(rule, 0.0)
    assert float(transition(rule, x, v, times[19], 0.0, eta)[1]) == pytest.approx(last_std, abs=5e-4)
    net = lambda x, t: 0.1 * x  # noqa: E731
    noise = torch.randn(64, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    traj = sampler.sample(net, noise, generator=torch.Generator().manual_seed(2))
    x_last = traj.latents[-2]
    gap = traj.latents[-1] - transition(rule, x_last, net(x_last, None), times[19], 0.0, eta)[0]  # the noise drawn
    assert traj.sde_steps == list(range(19))  # the last step is sampled, never trained
    if last_std:
        assert 0.85 < float(gap.std()) / last_std < 1.15 and abs(float(gap.mean())) < 0.2 * last_std
    else:
        assert float(gap.abs().max()) == 0.0
