"""Time grids against diffusers' scheduler and the FLUX.2 Klein pipeline."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

from precise_lightning.sampling import (
    Flux2Grid,
    LinearGrid,
    Sampler,
    SD3Grid,
    flux2_empirical_mu,
    shifted_linspace,
)
from precise_lightning.sampling.grids import flux2_timesteps


@pytest.mark.parametrize("num_steps", [2, 10, 20, 40])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sd3_grid_equals_diffusers_scheduler(num_steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)  # SD3.5 Medium: shift 3
    scheduler.set_timesteps(num_steps)
    ours = SD3Grid(shift)(num_steps)
    assert ours.shape == (num_steps + 1,)
    torch.testing.assert_close(ours.float(), scheduler.sigmas, rtol=0, atol=1e-7)


# FLUX.2 Klein's scheduler config (dynamic, exponential time shift, mu supplied by the pipeline).
FLUX2_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
)


@pytest.mark.parametrize("num_steps", [10, 20, 30])
@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 5000])
def test_flux2_grid_equals_pipeline(num_steps, image_seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)  # as Flux2KleinPipeline.__call__ prepares them
    mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)
    retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=sigmas, mu=mu)
    assert flux2_empirical_mu(image_seq_len, num_steps) == mu
    torch.testing.assert_close(Flux2Grid(image_seq_len)(num_steps).float(), scheduler.sigmas, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_steps", [10, 20, 30])
def test_flux2_grid_starts_at_exactly_one_at_every_size(num_steps):
    """The sampler refuses a grid that does not start at 1; at 1024 tokens (512 px) torch's scalar / tensor division
    once gave 1 - 1e-16, so the Klein recipe could not start (found by the real-size plan)."""
    starts = [float(flux2_timesteps(num_steps, n)[0]) for n in range(1, 4097)]
    assert all(start == 1.0 for start in starts)
    assert Sampler("precise", num_steps=num_steps, grid=Flux2Grid(1024)).timesteps[0] == 1


def test_shifted_linspace():
    torch.testing.assert_close(LinearGrid()(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    s = shifted_linspace(4, 3.0)
    torch.testing.assert_close(s[2], torch.tensor(1.5 / 2.0, dtype=torch.float64))  # 3 * .5 / (1 + 2 * .5)


def test_bad_grids_are_rejected():
    with pytest.raises(ValueError, match="num_steps must be an integer >= 2"):
        SD3Grid()(1)
    with pytest.raises(ValueError, match="shift must be > 0"):
        LinearGrid(shift=0.0)
    with pytest.raises(ValueError, match="image_seq_len must be >= 1"):
        Flux2Grid(0)


class _Policy:
    def default_grid(self):
        return Flux2Grid(256)  # a FLUX.2 policy at 256 px


def test_a_sampler_without_a_grid_samples_on_the_policy_s_own():
    sampler = Sampler("precise", num_steps=10)
    torch.testing.assert_close(sampler.timesteps, LinearGrid()(10), rtol=0, atol=0)  # no policy: uniform
    sampler.for_policy(_Policy())
    torch.testing.assert_close(sampler.timesteps, Flux2Grid(256)(10), rtol=0, atol=0)
    chosen = Sampler("precise", num_steps=10, grid=SD3Grid()).for_policy(_Policy())  # a config's grid is kept
    torch.testing.assert_close(chosen.timesteps, SD3Grid()(10), rtol=0, atol=0)
