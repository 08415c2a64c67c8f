"""One stochastic step in two modes (sample / score) and the rollout loop built on it.

Rollout and training both go through :func:`sde_step`, so a stored transition re-scored by the same network on
the same batch gives exactly the log-prob it was sampled with (importance ratio 1 at the first inner step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from precise_lightning.sampling.rules import MULTISTEP, RULES, check_rule, gaussian_log_prob, ode, previous_step

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x [B, ...], t 0-d) -> v [B, ...]


class PerSample:
    """One generator per batch row: a row's noise does not depend on which rows share its batch, micro-batch or
    rank, so a rollout split any way over processes draws the same noise."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)

    def __getitem__(self, rows: slice) -> PerSample:
        return PerSample(self.generators[rows])

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """[len(self), *shape[1:]] standard normal; row i from generator i (on its own device)."""
        if shape[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} per-sample generators for a batch of {shape[0]}")
        rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device)


Generators = torch.Generator | PerSample | Sequence[torch.Generator | None] | None


@dataclass
class StepOutput:
    x_next: Tensor  # [B, ...]
    mean: Tensor  # [B, ...]
    std: Tensor  # broadcastable to mean
    log_prob: Tensor  # [B] float32


@dataclass
class Trajectory:
    latents: Tensor  # [N + 1, B, ...]: latents[0] is the initial noise, latents[N] the sample
    timesteps: Tensor  # [N + 1], decreasing from 1 to 0
    sde_steps: list[int]  # the K stochastic steps i (x_i -> x_{i+1}), ascending
    log_probs: Tensor  # [B, K] log-prob of each stochastic transition
    stds: Tensor  # [K, ...] std of each stochastic transition
    means: Tensor | None = None  # [K, B, ...] when requested (KL or ratio normalisation needs them)
    d_prev: Tensor | None = None  # [K, B, ...] multistep rules: the previous step's x0_hat each step read (else 0)


def noise_like(x: Tensor, generator: torch.Generator | PerSample | None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device so a seed means the same noise."""
    if isinstance(generator, PerSample):
        return generator.randn(x.shape, x.dtype, x.device)
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def sde_step(
    rule: str,
    x: Tensor,
    v: Tensor,
    t: Tensor,
    t_next: Tensor,
    eta: float,
    x_next: Tensor | None = None,
    generator: torch.Generator | PerSample | None = None,
    reduce: str = "mean",
    **context,
) -> StepOutput:
    """Sample ``x_next`` (when None) or score the given one under the step's Gaussian transition.

    ``t``, ``t_next`` are 0-d tensors (or broadcastable over ``x``); ``eta`` must already be validated.
    """
    mean, std = RULES[rule](x, v, t, t_next, eta, **context)
    if x_next is None:
        x_next = mean + std * noise_like(x, generator)
    return StepOutput(x_next, mean, std, gaussian_log_prob(x_next, mean, std, reduce=reduce))


def _step_generator(generator: Generators, i: int) -> torch.Generator | PerSample | None:
    if generator is None or isinstance(generator, (torch.Generator, PerSample)):
        return generator
    return generator[i]


@torch.no_grad()
def rollout(
    velocity: Velocity,
    noise: Tensor,
    timesteps: Tensor,
    rule: str,
    eta: float | None = None,
    sde_steps: Sequence[int] | None = None,
    generator: Generators = None,
    keep_means: bool = False,
    reduce: str = "mean",
    lower_order_final: bool = True,
    stochastic_last_step: bool = False,
) -> Trajectory:
    """Integrate from ``noise`` (t = 1) along ``timesteps``; steps in ``sde_steps`` use ``rule``, the rest Euler.

    ``sde_steps`` defaults to every step but the last, which carries no log-prob and is deterministic
    (x_N = x0_hat) unless ``stochastic_last_step``: then it is ``rule``'s transition, noise included, as the
    Precise code samples every step (its ``flow_grpo`` / ``dance_grpo`` add noise of std about 0.2 there). ``generator`` is one generator for the whole rollout, a sequence with one per step, or
    :class:`PerSample` generators, one per batch row. A multistep rule's stochastic steps read the previous
    step's x0_hat (stochastic or not; see :func:`~precise_lightning.sampling.rules.previous_step`), stored in
    the trajectory so that re-scoring sees the same transition.
    """
    eta = check_rule(rule, eta)
    n = len(timesteps) - 1
    sde_steps = sorted(range(n - 1) if sde_steps is None else sde_steps) if rule != "ode" else []
    if sde_steps and (sde_steps[0] < 0 or sde_steps[-1] >= n - 1):
        raise ValueError(f"stochastic steps must lie in [0, {n - 2}] (the last step is deterministic), got {sde_steps}")
    if not isinstance(generator, (torch.Generator, PerSample, type(None))) and len(generator) != n:
        raise ValueError(f"got {len(generator)} generators for {n} steps; pass one per step or a single one")
    times = timesteps.to(device=noise.device, dtype=noise.dtype)
    stochastic = set(sde_steps)
    x, latents, log_probs, stds, means, d_prevs, x0_prev = noise, [noise], [], [], [], [], None
    for i in range(n):
        t, t_next = times[i], times[i + 1]
        v = velocity(x, t)
        if i in stochastic:
            j = previous_step(rule, i, timesteps, lower_order_final)
            context = {"d_prev": x0_prev, "t_prev": times[j]} if j is not None else {}
            out = sde_step(rule, x, v, t, t_next, eta, generator=_step_generator(generator, i), reduce=reduce,
                           **context)
            log_probs.append(out.log_prob)
            stds.append(out.std)
            if keep_means:
                means.append(out.mean)
            if rule in MULTISTEP:
                d_prevs.append(x0_prev if j is not None else torch.zeros_like(x))
            x_new = out.x_next
        elif stochastic_last_step and i == n - 1 and rule != "ode":
            j = previous_step(rule, i, timesteps, lower_order_final)
            context = {"d_prev": x0_prev, "t_prev": times[j]} if j is not None else {}
            x_new = sde_step(rule, x, v, t, t_next, eta, generator=_step_generator(generator, i), **context).x_next
        else:
            x_new = ode(x, v, t, t_next)[0]
        if rule in MULTISTEP:
            x0_prev = x - t * v
        x = x_new
        latents.append(x)
    batch = noise.shape[0]
    return Trajectory(
        latents=torch.stack(latents),
        timesteps=timesteps,
        sde_steps=list(sde_steps),
        log_probs=torch.stack(log_probs, dim=1) if log_probs else noise.new_zeros(batch, 0, dtype=torch.float32),
        stds=torch.stack(stds) if stds else noise.new_zeros(0),
        means=torch.stack(means) if keep_means and means else None,
        d_prev=torch.stack(d_prevs) if d_prevs else None,
    )
