"""Time grids: decreasing ``t_0 = 1 > t_1 > ... > t_N = 0`` as float64 tensors of length N + 1.

Pure functions that reproduce diffusers' ``FlowMatchEulerDiscreteScheduler`` sigmas (tested for parity), plus
small classes that wrap them so a config can choose a grid by ``class_path``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def _check_steps(num_steps: int) -> None:
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps}")


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3 timestep shift t -> s t / (1 + (s - 1) t) (arXiv 2403.03206 eq. 23)."""
    return shift * t / (1 + (shift - 1) * t)


def shifted_linspace(num_steps: int, shift: float = 1.0) -> Tensor:
    """``linspace(1, 0, N + 1)`` passed through the SD3 shift."""
    _check_steps(num_steps)
    return shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


def sd3_timesteps(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> Tensor:
    """The grid of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(N)``, then 0.

    diffusers spaces N points from 1 down to its *already shifted* sigma_min (computed in float32 at init) and
    shifts them again; we do the same so evaluation equals the stock SD3 pipeline.
    """
    _check_steps(num_steps)
    s_min = torch.tensor(1.0, dtype=torch.float32) / num_train_timesteps
    sigma_min = float(shift_time(s_min, torch.tensor(shift, dtype=torch.float32)))
    sigmas = shift_time(torch.linspace(1.0, sigma_min, num_steps, dtype=torch.float64), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def flux2_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The FLUX.2 pipeline's resolution- and step-dependent shift mu (linear fit between 10 and 200 steps)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return a2 * image_seq_len + b2
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    return slope * num_steps + (m_200 - 200.0 * slope)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """The FLUX.1 pipeline's shift mu, linear in the latent tokens per image (diffusers' ``calculate_shift``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def flux_timesteps(num_steps: int, image_seq_len: int, shift_terminal: float | None = None, **shift: float) -> Tensor:
    """FLUX.1 / Qwen-Image grid: ``linspace(1, 1/N, N)`` shifted by exp(mu) / (exp(mu) + 1/t - 1) with
    :func:`flux_mu`; with ``shift_terminal`` (Qwen-Image's 0.02) ``1 - t`` is then scaled so that the last time is
    ``shift_terminal`` (diffusers' ``stretch_shift_to_terminal``); then 0."""
    _check_steps(num_steps)
    times = _exponential_shift(num_steps, image_seq_len, lambda: flux_mu(image_seq_len, **shift))
    if shift_terminal:
        one_minus = 1 - times[:-1]
        times[:-1] = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
    return times


def flux2_timesteps(num_steps: int, image_seq_len: int) -> Tensor:
    """FLUX.2 Klein grid: ``linspace(1, 1/N, N)`` shifted by exp(mu) / (exp(mu) + 1/t - 1), then 0."""
    _check_steps(num_steps)
    return _exponential_shift(num_steps, image_seq_len, lambda: flux2_empirical_mu(image_seq_len, num_steps))


def _exponential_shift(num_steps: int, image_seq_len: int, mu_of: Callable[[], float]) -> Tensor:
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be >= 1 (latent tokens per image), got {image_seq_len}")
    mu = mu_of()
    t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    # elementwise division, as diffusers' numpy does: torch's scalar / tensor multiplies by a reciprocal, which left
    # the first time at 1 - 1e-16 (at 1024 tokens, the Klein recipe's 512 px) and the sampler refused the grid
    shift = torch.full_like(t, math.exp(mu))
    sigmas = shift / (shift + (1 / t - 1))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


class TimeGrid:
    """A grid family; ``grid(num_steps)`` gives the N + 1 times."""

    def __call__(self, num_steps: int) -> Tensor:
        raise NotImplementedError


class _ShiftedGrid(TimeGrid):
    def __init__(self, shift: float) -> None:
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift = shift


class LinearGrid(_ShiftedGrid):
    """Uniform grid in t, optionally shifted (shift 1 = plain linspace)."""

    def __init__(self, shift: float = 1.0) -> None:
        super().__init__(shift)

    def __call__(self, num_steps: int) -> Tensor:
        return shifted_linspace(num_steps, self.shift)


class SD3Grid(_ShiftedGrid):
    """Stable Diffusion 3 / 3.5 scheduler grid (shift 3 for SD3.5 Medium)."""

    def __init__(self, shift: float = 3.0) -> None:
        super().__init__(shift)

    def __call__(self, num_steps: int) -> Tensor:
        return sd3_timesteps(num_steps, self.shift)


class Flux2Grid(TimeGrid):
    """FLUX.2 Klein grid; ``image_seq_len`` is latent tokens per image (1024 at 512 px). A FLUX.2 policy's own
    grid (``Flux2KleinPolicy.default_grid``) takes it from the policy's resolution."""

    def __init__(self, image_seq_len: int) -> None:
        if image_seq_len < 1:
            raise ValueError(f"image_seq_len must be >= 1 (latent tokens per image), got {image_seq_len}")
        self.image_seq_len = image_seq_len

    def __call__(self, num_steps: int) -> Tensor:
        return flux2_timesteps(num_steps, self.image_seq_len)


class FluxGrid(Flux2Grid):
    """The grid of diffusers' dynamically shifted schedulers (FLUX.1, Qwen-Image; the defaults are FLUX.1-dev's
    scheduler config); a policy's own grid (``default_grid``) takes the tokens from the policy's resolution and the
    rest from its scheduler's config."""

    def __init__(self, image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                 max_shift: float = 1.15, shift_terminal: float | None = None) -> None:
        super().__init__(image_seq_len)
        if shift_terminal is not None and not 0 < shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in (0, 1) (the last time before 0), got {shift_terminal}")
        self.shift = dict(base_seq_len=base_seq_len, max_seq_len=max_seq_len, base_shift=base_shift,
                          max_shift=max_shift)
        self.shift_terminal = shift_terminal

    def __call__(self, num_steps: int) -> Tensor:
        return flux_timesteps(num_steps, self.image_seq_len, self.shift_terminal, **self.shift)
