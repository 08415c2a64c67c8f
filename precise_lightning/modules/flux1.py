"""FLUX.1-dev policy on the diffusers ``FluxPipeline`` components."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from diffusers import FluxPipeline
from torch import Tensor, nn

from precise_lightning.modules.pipeline_policy import PipelinePolicy, denoiser_dtype
from precise_lightning.sampling import FluxGrid
from precise_lightning.tiny.models import flux1_dev_pipeline


class FluxPolicy(PipelinePolicy):
    """FLUX.1-dev: CLIP-L pooled and T5 prompt embeddings (the pipeline's ``encode_prompt``), latents kept as the
    VAE's ``[C, H/8, W/8]`` grid and packed into 2x2 tokens with their position ids for each transformer call,
    decoded with the VAE's scaling and shift, sampled on the scheduler's dynamically shifted grid at the policy's
    resolution (``FluxGrid``).

    FLUX.1-dev is guidance distilled: ``guidance`` is an input of the transformer (the pipeline's
    ``guidance_scale``, 3.5), not a second, unconditional forward; ``guidance_scale`` (true classifier-free
    guidance) stays 1. Other arguments: :class:`PipelinePolicy`'s (``model`` defaults to FLUX.1-dev).
    """

    pipeline_class = FluxPipeline
    random_pipeline = staticmethod(partial(flux1_dev_pipeline, "real"))
    frozen = ("text_encoder", "text_encoder_2", "vae")

    def __init__(self, model: str = "black-forest-labs/FLUX.1-dev", guidance: float = 3.5, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if not self.pipeline.transformer.config.guidance_embeds:
            raise ValueError(f"{model} has no guidance embedding (FLUX.1-schnell?): FluxPolicy trains FLUX.1-dev")
        if guidance <= 0:
            raise ValueError(f"guidance must be > 0 (FLUX.1-dev's embedded guidance, 3.5 by default), got {guidance}")
        self.guidance = guidance

    def default_grid(self) -> FluxGrid:
        """``linspace(1, 1/N, N)`` shifted by the scheduler's mu at this resolution's latent tokens."""
        c = self.pipeline.scheduler.config
        return FluxGrid(self.latent_shape[1] * self.latent_shape[2] // 4, c.base_image_seq_len, c.max_image_seq_len,
                        c.base_shift, c.max_shift)

    def latent_shape_for(self, pipe: FluxPipeline, resolution: int) -> tuple[int, ...]:
        factor = pipe.vae_scale_factor * 2
        if resolution % factor:
            raise ValueError(f"resolution ({resolution}) must be a multiple of {factor} (VAE factor x 2x2 packing)")
        side = resolution // pipe.vae_scale_factor
        return (pipe.transformer.config.in_channels // 4, side, side)

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"embeds": [B, L, D], "pooled": [B, P], "text_ids": [B, L, 3]} (ids repeated per row, so that a batch
        slices like the others)."""
        embeds, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)
        return {"embeds": embeds, "pooled": pooled, "text_ids": text_ids.expand(len(prompts), -1, -1)}

    def transformer_velocity(self, net: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        pipe, dtype = self.pipeline, denoiser_dtype(net)
        b, c, h, w = x.shape
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        guidance = torch.full((b,), self.guidance, device=x.device, dtype=torch.float32)
        v = net(hidden_states=pipe._pack_latents(x, b, c, h, w).to(dtype), timestep=(t * 1000).expand(b) / 1000,
                guidance=guidance, pooled_projections=cond["pooled"].to(dtype),
                encoder_hidden_states=cond["embeds"].to(dtype), txt_ids=cond["text_ids"][0], img_ids=img_ids,
                return_dict=False)[0]
        return pipe._unpack_latents(v, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        config = self.vae.config
        latents = latents.to(self.vae.dtype) / config.scaling_factor + config.shift_factor
        images = self.vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images, output_type="pt").float()
