"""FLUX.2 Klein policy on the diffusers ``Flux2KleinPipeline`` components."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from diffusers import Flux2KleinPipeline
from torch import Tensor, nn

from precise_lightning.modules.pipeline_policy import PipelinePolicy, denoiser_dtype
from precise_lightning.sampling import Flux2Grid
from precise_lightning.tiny.models import flux2_klein_pipeline


class Flux2KleinPolicy(PipelinePolicy):
    """FLUX.2 Klein: Qwen3 prompt embeddings (the pipeline's hidden layers), latents kept as the pipeline's
    patchified ``[4C, H/16, W/16]`` grid and packed into tokens with its position ids for each transformer call,
    decoded with the VAE's batch-norm statistics, sampled on the pipeline's grid for the policy's resolution
    (``Flux2Grid(image_seq_len)``). Arguments: :class:`PipelinePolicy`'s (``model`` defaults to Klein base 4B).
    """

    pipeline_class = Flux2KleinPipeline
    random_pipeline = staticmethod(partial(flux2_klein_pipeline, "real"))
    frozen = ("text_encoder", "vae")

    def __init__(self, model: str = "black-forest-labs/FLUX.2-klein-base-4B", **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if self.pipeline.config.is_distilled and self.guidance_scale > 1:
            raise ValueError("this FLUX.2 Klein checkpoint is step-distilled and ignores guidance: set guidance_scale 1")

    def default_grid(self) -> Flux2Grid:
        """``linspace(1, 1/N, N)`` shifted by FLUX.2's empirical mu at this resolution's latent tokens."""
        return Flux2Grid(self.image_seq_len)

    def latent_shape_for(self, pipe: Flux2KleinPipeline, resolution: int) -> tuple[int, ...]:
        factor = pipe.vae_scale_factor * 2
        if resolution % factor:
            raise ValueError(f"resolution ({resolution}) must be a multiple of {factor} (VAE factor x 2x2 packing)")
        side = resolution // factor
        return (pipe.transformer.config.in_channels, side, side)

    @property
    def image_seq_len(self) -> int:
        """Latent tokens per image, what the FLUX.2 grid's shift depends on."""
        return self.latent_shape[1] * self.latent_shape[2]

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"embeds": [B, L, D], "text_ids": [B, L, 4]}."""
        embeds, text_ids = self.pipeline.encode_prompt(prompt=prompts, device=self.device,
                                                       max_sequence_length=self.max_sequence_length)
        return {"embeds": embeds, "text_ids": text_ids}

    def transformer_velocity(self, net: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        pipe, dtype = self.pipeline, denoiser_dtype(net)
        latent_ids = pipe._prepare_latent_ids(x).to(x.device)  # [B, h*w, 4], row-major as _pack_latents orders tokens
        v = net(hidden_states=pipe._pack_latents(x).to(dtype), timestep=(t * 1000) / 1000, guidance=None,
                encoder_hidden_states=cond["embeds"].to(dtype), txt_ids=cond["text_ids"], img_ids=latent_ids,
                return_dict=False)[0]
        return v.transpose(1, 2).reshape(x.shape)  # tokens back to the [B, C, h, w] grid (inverse of the packing)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        latents = self.pipeline._unpatchify_latents(latents.to(vae.dtype) * std.to(vae.dtype) + mean.to(vae.dtype))
        images = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images, output_type="pt").float()
