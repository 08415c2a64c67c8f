"""Stochastic samplers for flow-matching models: step rules, time grids and the rollout loop. Pure torch.

Conventions, used by every function here:

- ``x_t = (1 - t) x0 + t eps`` with ``t`` in [0, 1]; ``t = 1`` is pure noise (diffusers' ``sigma`` is our ``t``).
- The network predicts the velocity ``v = eps - x0``; sampling runs ``t -> t' < t``.
- Clean-latent posterior mean ``x0_hat = x - t v``; noise estimate ``eps_hat = x + (1 - t) v``.
- Half log-SNR ``lam(t) = log((1 - t) / t)``; a step has ``h = lam(t') - lam(t) > 0`` and
  ``r = exp(-h) = t'(1 - t) / (t (1 - t'))``.
- Every step is a Gaussian transition ``N(mean, std^2 I)``; its log-prob is reduced over non-batch dims
  (mean by default, as the reference implementations) and computed in at least float32.
"""

from precise_lightning.sampling.grids import (
    Flux2Grid,
    FluxGrid,
    LinearGrid,
    SD3Grid,
    TimeGrid,
    flux2_empirical_mu,
    flux2_timesteps,
    flux_mu,
    flux_timesteps,
    sd3_timesteps,
    shifted_linspace,
)
from precise_lightning.sampling.rollout import PerSample, StepOutput, Trajectory, rollout, sde_step
from precise_lightning.sampling.rules import (
    DEFAULT_ETA,
    RULES,
    gaussian_log_prob,
    posterior_estimates,
    transition,
    velocity_gain,
)
from precise_lightning.sampling.sampler import Sampler, seeded_generators

__all__ = [
    "DEFAULT_ETA",
    "RULES",
    "Flux2Grid",
    "FluxGrid",
    "LinearGrid",
    "PerSample",
    "SD3Grid",
    "Sampler",
    "StepOutput",
    "TimeGrid",
    "Trajectory",
    "flux2_empirical_mu",
    "flux2_timesteps",
    "flux_mu",
    "flux_timesteps",
    "gaussian_log_prob",
    "posterior_estimates",
    "rollout",
    "sd3_timesteps",
    "sde_step",
    "seeded_generators",
    "shifted_linspace",
    "transition",
    "velocity_gain",
]
