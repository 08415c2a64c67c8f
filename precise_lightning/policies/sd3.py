"""Stable Diffusion 3 / 3.5 policy on the diffusers ``StableDiffusion3Pipeline`` components."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from torch import Tensor, nn
from transformers import T5Config, T5EncoderModel

from precise_lightning.architectures.parts import (
    CLIP_L_TEXT,
    T5_XXL,
    TINY_RESOLUTION,
    TINY_VAE,
    Size,
    capped,
    clip_text,
    kl_vae,
    tiny_clip_text,
)
from precise_lightning.architectures.tokenizers import clip_tokenizer, t5_tokenizer
from precise_lightning.policies.pipeline import PipelinePolicy, denoiser_dtype, scaled_decode
from precise_lightning.sampling import SD3Grid

SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"
# The config.json of each component of stabilityai/stable-diffusion-3.5-medium (transformer/, text_encoder/,
# text_encoder_2/, text_encoder_3/, vae/), the architecture keys as published; the weights' sizes in that repository's
# file listing are the published figures tests/test_real_size.py checks.
PUBLISHED: dict[str, dict[str, Any]] = {
    "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
        dual_attention_layers=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
    "text_encoder": CLIP_L_TEXT,
    "text_encoder_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        projection_dim=1280, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"),
    "text_encoder_3": T5_XXL,
    "vae": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
        layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False),
}


class SD3Policy(PipelinePolicy):
    """Stable Diffusion 3 / 3.5 on the ``StableDiffusion3Pipeline`` components: transformer velocity at
    ``timestep = 1000 t``; prompts through the pipeline's ``encode_prompt`` (CLIP-L, CLIP-G, T5); latents decoded
    with the VAE's scaling and shift factors and the pipeline's image processor; sampled on the scheduler's
    shifted grid. Arguments: :class:`PipelinePolicy`'s (``model`` defaults to SD3.5 Medium).
    """

    hub_id = SD35_MEDIUM
    pipeline_class = StableDiffusion3Pipeline
    frozen = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")

    @staticmethod
    def build(size: Size = "tiny", depth: int | None = None) -> StableDiffusion3Pipeline:
        """SD3.5 Medium: CLIP-L / CLIP-G / T5 text encoders whose CLIP embeddings are concatenated and padded to T5's
        width (joint_attention_dim), pooled CLIP-L + CLIP-G; real: the 2.5B transformer with its 13 dual-attention
        blocks and T5-XXL."""
        tokenizer_3 = t5_tokenizer()
        if size == "tiny":
            clip_l, clip_g = tiny_clip_text(16, "quick_gelu"), tiny_clip_text(16, "gelu")
            t5 = T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1, vocab_size=len(tokenizer_3))
            transformer = dict(sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, num_layers=2,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                               caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=32,
                               dual_attention_layers=(0,))
            vae = dict(TINY_VAE, latent_channels=4)
        else:
            real = PUBLISHED
            clip_l = clip_text(**real["text_encoder"] | capped(real["text_encoder"], "num_hidden_layers", depth))
            clip_g = clip_text(**real["text_encoder_2"] | capped(real["text_encoder_2"], "num_hidden_layers", depth))
            t5 = T5Config(**real["text_encoder_3"] | capped(real["text_encoder_3"], "num_layers", depth))
            transformer = real["transformer"] | capped(real["transformer"], "num_layers", depth)
            transformer["dual_attention_layers"] = tuple(i for i in transformer["dual_attention_layers"]
                                                         if i < transformer["num_layers"])
            vae = dict(real["vae"])
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**{"patch_size": 2, "qk_norm": "rms_norm"} | transformer),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=kl_vae(PUBLISHED["vae"], vae),
            text_encoder=clip_l, tokenizer=clip_tokenizer(), text_encoder_2=clip_g,
            tokenizer_2=clip_tokenizer(pad_token="!"), text_encoder_3=T5EncoderModel(t5), tokenizer_3=tokenizer_3,
        )

    def default_grid(self) -> SD3Grid:
        """diffusers' ``FlowMatchEulerDiscreteScheduler`` grid with the pipeline's own shift (3 for SD3.5)."""
        return SD3Grid(shift=self.pipeline.scheduler.config.shift)

    def latent_shape_for(self, pipe: StableDiffusion3Pipeline, resolution: int) -> tuple[int, ...]:
        factor = pipe.vae_scale_factor * pipe.transformer.config.patch_size
        if resolution % factor:
            raise ValueError(f"resolution ({resolution}) must be a multiple of {factor} (VAE factor x patch size)")
        side = resolution // pipe.vae_scale_factor
        return (pipe.transformer.config.in_channels, side, side)

    def pipeline_call_arguments(self, latents: Tensor) -> dict[str, Any]:
        return super().pipeline_call_arguments(latents) | {"negative_prompt": self.negative_prompt}

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
        return scaled_decode(self.vae, self.pipeline.image_processor, latents)

