"""FLUX.1-dev policy on the diffusers ``FluxPipeline`` components."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from precise_lightning.architectures.parts import CLIP_L_TEXT, T5_XXL, TINY_VAE, Size, capped, kl_vae
from precise_lightning.architectures.tokenizers import clip_tokenizer, t5_tokenizer
from precise_lightning.policies.pipeline import PackedLatentPolicy, denoiser_dtype, scaled_decode
from precise_lightning.sampling import FluxGrid

FLUX1_DEV = "black-forest-labs/FLUX.1-dev"
# The config.json of each component of black-forest-labs/FLUX.1-dev (transformer/, text_encoder/, text_encoder_2/,
# vae/, scheduler/), the architecture keys as published, transcribed (the hub cannot be reached from this machine: not
# yet checked against a download).
PUBLISHED: dict[str, dict[str, Any]] = {
    "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=[16, 56, 56]),
    "text_encoder": CLIP_L_TEXT,
    "text_encoder_2": T5_XXL,
    "vae": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
        layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False),
    "scheduler": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096),
}


class FluxPolicy(PackedLatentPolicy):
    """FLUX.1-dev: CLIP-L pooled and T5 prompt embeddings (the pipeline's ``encode_prompt``), latents kept as the
    VAE's ``[C, H/8, W/8]`` grid and packed into 2x2 tokens with their position ids for each transformer call,
    decoded with the VAE's scaling and shift, sampled on the scheduler's dynamically shifted grid at the policy's
    resolution (``FluxGrid``).

    FLUX.1-dev is guidance distilled: ``guidance`` is an input of the transformer (the pipeline's
    ``guidance_scale``, 3.5), not a second, unconditional forward; ``guidance_scale`` (true classifier-free
    guidance) stays 1. Other arguments: :class:`PipelinePolicy`'s (``model`` defaults to FLUX.1-dev).
    """

    hub_id = FLUX1_DEV
    pipeline_class = FluxPipeline
    frozen = ("text_encoder", "text_encoder_2", "vae")

    def __init__(self, guidance: float = 3.5, **kwargs: Any) -> None:
        if guidance <= 0:
            raise ValueError(f"guidance must be > 0 (FLUX.1-dev's embedded guidance, 3.5 by default), got {guidance}")
        super().__init__(**kwargs)
        if not self.pipeline.transformer.config.guidance_embeds:
            raise ValueError(f"{self.model} has no guidance embedding (FLUX.1-schnell?): FluxPolicy trains FLUX.1-dev")
        self.guidance = guidance

    @staticmethod
    def build(size: Size = "tiny", depth: int | None = None) -> FluxPipeline:
        """FLUX.1-dev: a FLUX.1 transformer (19 double + 38 single blocks, guidance distilled: the guidance is an input
        embedding), CLIP-L (pooled) and T5-XXL, the 16-channel VAE with scaling and shift, the scheduler's dynamic
        shift."""
        tokenizer_2 = t5_tokenizer()
        real = PUBLISHED
        if size == "tiny":
            clip = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        projection_dim=16, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
            t5 = T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1, vocab_size=len(tokenizer_2))
            transformer = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                               axes_dims_rope=(2, 2, 4))
            vae = dict(TINY_VAE, latent_channels=4)
        else:
            clip = real["text_encoder"] | capped(real["text_encoder"], "num_hidden_layers", depth)
            t5 = T5Config(**real["text_encoder_2"] | capped(real["text_encoder_2"], "num_layers", depth))
            transformer = real["transformer"] | capped(real["transformer"], "num_layers", depth) \
                | capped(real["transformer"], "num_single_layers", depth)
            vae = dict(real["vae"])
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**real["scheduler"]), vae=kl_vae(PUBLISHED["vae"], vae),
            text_encoder=CLIPTextModel(CLIPTextConfig(**clip)), tokenizer=clip_tokenizer(),
            text_encoder_2=T5EncoderModel(t5), tokenizer_2=tokenizer_2,
            transformer=FluxTransformer2DModel(**{"patch_size": 1, "guidance_embeds": True} | transformer),
        )

    def default_grid(self) -> FluxGrid:
        """``linspace(1, 1/N, N)`` shifted by the scheduler's mu at this resolution's latent tokens."""
        c = self.pipeline.scheduler.config
        return FluxGrid(self.latent_shape[1] * self.latent_shape[2] // 4, c.base_image_seq_len, c.max_image_seq_len,
                        c.base_shift, c.max_shift)

    def pipeline_call_arguments(self, latents: Tensor) -> dict[str, Any]:
        return super().pipeline_call_arguments(latents) | {"guidance_scale": self.guidance}

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
        return scaled_decode(self.vae, self.pipeline.image_processor, latents)
