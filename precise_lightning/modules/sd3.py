"""Stable Diffusion 3 / 3.5 policy on the diffusers ``StableDiffusion3Pipeline`` components."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from torch import Tensor, nn

from precise_lightning.modules.pipeline_policy import PipelinePolicy, denoiser_dtype
from precise_lightning.sampling import SD3Grid
from precise_lightning.tiny.models import sd35_pipeline


class SD3Policy(PipelinePolicy):
    """Stable Diffusion 3 / 3.5 on the ``StableDiffusion3Pipeline`` components: transformer velocity at
    ``timestep = 1000 t``; prompts through the pipeline's ``encode_prompt`` (CLIP-L, CLIP-G, T5); latents decoded
    with the VAE's scaling and shift factors and the pipeline's image processor; sampled on the scheduler's
    shifted grid. Arguments: :class:`PipelinePolicy`'s (``model`` defaults to SD3.5 Medium).
    """

    pipeline_class = StableDiffusion3Pipeline
    random_pipeline = staticmethod(partial(sd35_pipeline, "real"))
    frozen = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")

    def __init__(self, model: str = "stabilityai/stable-diffusion-3.5-medium", **kwargs: Any) -> None:
        super().__init__(model, **kwargs)

    def default_grid(self) -> SD3Grid:
        """diffusers' ``FlowMatchEulerDiscreteScheduler`` grid with the pipeline's own shift (3 for SD3.5)."""
        return SD3Grid(shift=self.pipeline.scheduler.config.shift)

    def latent_shape_for(self, pipe: StableDiffusion3Pipeline, resolution: int) -> tuple[int, ...]:
        factor = pipe.vae_scale_factor * pipe.transformer.config.patch_size
        if resolution % factor:
            raise ValueError(f"resolution ({resolution}) must be a multiple of {factor} (VAE factor x patch size)")
        side = resolution // pipe.vae_scale_factor
        return (pipe.transformer.config.in_channels, side, side)

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"embeds": [B, L, D], "pooled": [B, P]}."""
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"embeds": embeds, "pooled": pooled}

    def transformer_velocity(self, net: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        dtype = denoiser_dtype(net)
        return net(hidden_states=x.to(dtype), timestep=t * 1000, encoder_hidden_states=cond["embeds"].to(dtype),
                   pooled_projections=cond["pooled"].to(dtype), return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        config = self.vae.config
        latents = latents.to(self.vae.dtype) / config.scaling_factor + config.shift_factor
        images = self.vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images, output_type="pt").float()
