"""Stable Diffusion 3 / 3.5 policy on the diffusers ``StableDiffusion3Pipeline`` components."""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline
from torch import Tensor, nn

from precise_lightning.hub import Dtype
from precise_lightning.modules.pipeline_policy import PipelinePolicy, denoiser_dtype


class SD3Policy(PipelinePolicy):
    """SD3 transformer velocity at ``timestep = 1000 t``; prompts through the pipeline's ``encode_prompt`` (CLIP-L,
    CLIP-G, T5), latents decoded with the VAE's scaling and shift factors and the pipeline's image processor.

    Args:
        model: hub id or local directory of a diffusers SD3 pipeline (``stabilityai/stable-diffusion-3.5-medium``).
        revision: hub revision.
        resolution: image side in pixels (a multiple of the VAE factor times the patch size).
        guidance_scale: classifier-free guidance weight, in rollout and training; 1 disables it (Flow-GRPO's SD3.5
            recipe: 4.5).
        negative_prompt: the unconditional prompt.
        max_sequence_length: T5 tokens (the pipeline's default, 256).
        text_dtype: dtype of the frozen text encoders and VAE (default bfloat16 on GPU machines, float32 on CPU).
        gradient_checkpointing: recompute transformer activations in the backward pass (less memory, slower).
        lora_rank, lora_alpha, lora_targets: see :class:`Policy` (0 = full fine-tuning of the transformer).
    """

    pipeline_class = StableDiffusion3Pipeline
    frozen = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")

    def __init__(
        self,
        model: str = "stabilityai/stable-diffusion-3.5-medium",
        revision: str | None = None,
        resolution: int = 512,
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
        max_sequence_length: int = 256,
        text_dtype: Dtype | None = None,
        gradient_checkpointing: bool = False,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_targets: list[str] | None = None,
    ) -> None:
        self.max_sequence_length = max_sequence_length
        super().__init__(model, revision, resolution, guidance_scale, negative_prompt, text_dtype,
                         gradient_checkpointing, lora_rank, lora_alpha, lora_targets)

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
