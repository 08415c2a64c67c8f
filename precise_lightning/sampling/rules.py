"""Step rules: each maps (x_t, v, t, t') to the Gaussian transition N(mean, std^2 I) of one sampling step.

Conventions are stated in ``precise_lightning/sampling/__init__.py``. Every rule is a pure function
``rule(x, v, t, t_next, eta, **context) -> (mean, std)`` where ``x, v`` are ``[B, ...]`` and ``t, t_next``
are already tensors broadcastable against ``x`` (see :func:`transition`, which prepares them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

StepRule = Callable[..., tuple[Tensor, Tensor]]

LOG_2PI = math.log(2.0 * math.pi)


def posterior_estimates(x: Tensor, v: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Clean-latent mean x0_hat = x - t v and noise estimate eps_hat = x + (1 - t) v, for x_t = (1 - t) x0 + t eps."""
    return x - t * v, x + (1 - t) * v


def _renoise(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
    """Shared mean form: (1-t') x0_hat + t' rho eps_hat with std t' sqrt(1 - rho^2), so total variance stays t'^2."""
    x0_hat, eps_hat = posterior_estimates(x, v, t)
    mean = (1 - t_next) * x0_hat + t_next * rho * eps_hat  # t' rho == sqrt(t'^2 - std^2), exactly
    std = t_next * torch.sqrt((1 - rho * rho).clamp_min(0))  # clamp: round-off only, rho <= 1 by construction
    return mean, std


def ode(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, eta: float = 0.0) -> tuple[Tensor, Tensor]:
    """Deterministic Euler step of the probability-flow ODE: mean x + (t' - t) v, std 0."""
    return x + (t_next - t) * v, torch.zeros_like(t_next)


def flow_sde(
    x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, eta: float = 0.7, t_at_one: Tensor | float | None = None
) -> tuple[Tensor, Tensor]:
    """Flow-GRPO Euler-Maruyama step (arXiv 2505.05470 eq. 9), s_t = eta sqrt(t / (1 - t)).

    ``t_at_one`` replaces ``t`` in ``1 - t`` where ``t == 1`` (the SDE's noise is infinite there); Flow-GRPO uses
    the grid's second point, which is ``t_next`` on the first step of any grid that starts at 1, the default.
    """
    t_den = torch.where(t == 1, t_next if t_at_one is None else torch.as_tensor(t_at_one, dtype=t.dtype), t)
    s2 = eta**2 * t / (1 - t_den)
    drift = v + s2 / (2 * t) * (x + (1 - t) * v)
    return x + drift * (t_next - t), torch.sqrt(s2 * (t - t_next))


def dance_sde(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, eta: float = 0.3) -> tuple[Tensor, Tensor]:
    """DanceGRPO Euler-Maruyama step with constant diffusion g = eta (arXiv 2505.07818)."""
    x0_hat, _ = posterior_estimates(x, v, t)
    score = -(x - (1 - t) * x0_hat) / t**2
    dt = t_next - t
    return x + v * dt - 0.5 * eta**2 * score * dt, eta * torch.sqrt(t - t_next)


def cps(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, eta: float = 0.7) -> tuple[Tensor, Tensor]:
    """Coefficients-preserving sampling (arXiv 2509.05952): renoise a fixed fraction, std = t' sin(eta pi / 2)."""
    rho = torch.full_like(t_next, math.cos(eta * math.pi / 2))
    return _renoise(x, v, t, t_next, rho)


def precise(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, eta: float = 1.5) -> tuple[Tensor, Tensor]:
    """Precise (arXiv 2605.23522): exact solution of the frozen-x0_hat SDE with g^2 = eta^2 t / (1 - t).

    rho = r^(eta^2 / 2) with r = exp(-h) = t'(1 - t) / (t (1 - t')), so std = t' sqrt(1 - r^(eta^2)).
    """
    r = t_next * (1 - t) / (t * (1 - t_next))
    return _renoise(x, v, t, t_next, r.pow(eta**2 / 2))


def half_log_snr(t: Tensor) -> Tensor:
    """lambda(t) = log((1 - t) / t), the half log signal-to-noise ratio of x_t = (1 - t) x0 + t eps."""
    return torch.log((1 - t) / t)


def precise_2m(
    x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, eta: float = 1.5, d_prev: Tensor | None = None,
    t_prev: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """Precise-2M: Precise's step plus the exact integral of x0_hat taken linear in lambda through the previous
    step's x0_hat ``d_prev`` (at ``t_prev``); the same std. First order (Precise) without a previous step.

    With h = lambda(t') - lambda(t), k = 1 + eta^2 / 2 and D = x0_hat:
    mean += (1 - t') (h - (1 - exp(-k h)) / k) (D - d_prev) / (lambda(t) - lambda(t_prev)).
    At eta = sqrt(2) this is DPM-Solver++(2M) SDE with the Heun form of its second-order term (diffusers'
    ``sde-dpmsolver++``, ``solver_type="heun"``).
    """
    mean, std = precise(x, v, t, t_next, eta)
    if d_prev is None:
        return mean, std
    k = 1 + eta**2 / 2
    h = half_log_snr(t_next) - half_log_snr(t)
    h_prev = half_log_snr(t) - half_log_snr(torch.as_tensor(t_prev, dtype=t.dtype, device=t.device))
    gain = torch.where(t_next > 0, h + torch.expm1(-k * h) / k, torch.zeros_like(h))  # t' = 0: x0_hat exactly
    x0_hat, _ = posterior_estimates(x, v, t)
    return mean + (1 - t_next) * gain / h_prev * (x0_hat - d_prev), std


def dance_precise(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, eta: float = 0.3) -> tuple[Tensor, Tensor]:
    """Exact frozen-x0_hat solution of DanceGRPO's SDE (g = eta): rho = exp(-eta^2 / 2 (1/t' - 1/t))."""
    if eta == 0:  # avoids 0 * inf at t' = 0
        return ode(x, v, t, t_next)
    rho = torch.exp(-0.5 * eta**2 * (1 / t_next - 1 / t))  # t' = 0 gives exp(-inf) = 0: fully denoised
    return _renoise(x, v, t, t_next, rho)


RULES: dict[str, StepRule] = {
    "ode": ode,
    "flow_sde": flow_sde,
    "dance_sde": dance_sde,
    "cps": cps,
    "precise": precise,
    "precise_2m": precise_2m,
    "dance_precise": dance_precise,
}
MULTISTEP = frozenset({"precise_2m"})  # rules whose step also reads the previous step's x0_hat
DEFAULT_ETA: dict[str, float] = {
    "ode": 0.0,
    "flow_sde": 0.7,
    "dance_sde": 0.3,
    "cps": 0.7,
    "precise": 1.5,
    "precise_2m": 1.5,
    "dance_precise": 0.3,
}


def check_rule(rule: str, eta: float | None) -> float:
    """Validate a rule name and noise level; return the effective eta (the rule's default when None)."""
    if rule not in RULES:
        raise ValueError(f"unknown step rule {rule!r}; choose one of {sorted(RULES)}")
    eta = DEFAULT_ETA[rule] if eta is None else float(eta)
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta} for rule {rule!r}")
    if rule == "cps" and eta > 1:
        raise ValueError(f"cps needs eta in [0, 1] (std = t' sin(eta pi/2) must not exceed t'), got {eta}")
    return eta


def as_time(t: Tensor | float, x: Tensor) -> Tensor:
    """A time as a tensor broadcastable over ``x`` [B, ...]: scalars stay 0-d, ``[B]`` becomes ``[B, 1, ..., 1]``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 1 and x.ndim > 1:
        t = t.reshape(-1, *([1] * (x.ndim - 1)))
    return t


def transition(
    rule: str, x: Tensor, v: Tensor, t: Tensor | float, t_next: Tensor | float, eta: float | None = None, **context
) -> tuple[Tensor, Tensor]:
    """Gaussian transition (mean [B, ...], std broadcastable to mean) of one step ``t -> t_next`` under ``rule``."""
    eta = check_rule(rule, eta)
    t, t_next = as_time(t, x), as_time(t_next, x)
    if (t_next >= t).any() or (t > 1).any() or (t_next < 0).any():
        raise ValueError("a step needs 1 >= t > t_next >= 0 (sampling runs from noise at t=1 to data at t=0)")
    return RULES[rule](x, v, t, t_next, eta, **context)


def previous_step(rule: str, i: int, times: Tensor, lower_order_final: bool = True) -> int | None:
    """The step whose x0_hat a multistep rule's step ``i`` reads: ``i - 1``, or None (first order) on the first
    step, after a step from t = 1 (its lambda is -inf: nothing to extrapolate from) and, with
    ``lower_order_final``, on the step into the last nonzero time (as DPM-Solver++ does on short grids)."""
    n = len(times) - 1
    if rule not in MULTISTEP or i == 0 or float(times[i - 1]) >= 1 or (lower_order_final and i == n - 2):
        return None
    return i - 1


def velocity_gain(rule: str, t: float, t_next: float, eta: float | None = None, t_prev: float | None = None) -> float:
    """d mean / d v of one step (every rule's mean is affine in v; a multistep rule's previous x0_hat, at
    ``t_prev``, is held fixed): GRPO-Guard divides the policy loss by its size."""
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    context = {"d_prev": zero, "t_prev": t_prev} if t_prev is not None else {}
    return float(transition(rule, zero, one, t, t_next, eta, **context)[0]
                 - transition(rule, zero, zero, t, t_next, eta, **context)[0])


def reduce_elements(values: Tensor, reduce: str = "mean") -> Tensor:
    """Mean or sum over every non-batch dim: [B, ...] -> [B] ([B] stays as is; torch's dim=() would reduce all)."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    dims = tuple(range(1, values.ndim))
    if not dims:
        return values
    return values.mean(dim=dims) if reduce == "mean" else values.sum(dim=dims)


def gaussian_log_prob(
    x_next: Tensor, mean: Tensor, std: Tensor | float, reduce: str = "mean", std_floor: float = 1e-12
) -> Tensor:
    """Log-density of ``x_next`` under N(mean, std^2 I), reduced over non-batch dims -> [B] float32.

    Computed in float32 or the inputs' wider precision (float64 stays float64 until the result), returned as
    float32 as the reference implementations do, so bf16 models get full-precision log-probs and ratios.

    ``reduce="mean"`` matches Flow-GRPO / DanceGRPO (their PPO clip ranges are calibrated to it); ``"sum"`` is the
    exact joint log-density. ``std`` is floored at ``std_floor`` so a deterministic step yields a finite value.
    """
    dtype = torch.promote_types(x_next.dtype, torch.float32)
    x_next, mean = x_next.to(dtype), mean.to(dtype)
    std = torch.as_tensor(std, dtype=dtype, device=x_next.device).clamp_min(std_floor)
    log_p = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * LOG_2PI
    return reduce_elements(log_p.expand_as(x_next), reduce).float()
