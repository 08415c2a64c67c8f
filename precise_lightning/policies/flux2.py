"""FLUX.2 Klein policy on the diffusers ``Flux2KleinPipeline`` components."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from torch import Tensor, nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from precise_lightning.architectures.parts import TINY_VAE, Size, capped
from precise_lightning.architectures.tokenizers import qwen3_tokenizer
from precise_lightning.policies.pipeline import PipelinePolicy, denoiser_dtype
from precise_lightning.sampling import Flux2Grid

FLUX2_KLEIN = "black-forest-labs/FLUX.2-klein-base-4B"
# The config.json of each component of black-forest-labs/FLUX.2-klein-base-4B (transformer/, text_encoder/: Qwen3-4B,
# vae/), the architecture keys as published; the weights' sizes in that repository's file listing are the published
# figures tests/test_real_size.py checks.
PUBLISHED: dict[str, dict[str, Any]] = {
    "transformer": dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=[32, 32, 32, 32], rope_theta=2000, eps=1e-06, guidance_embeds=False),
    "text_encoder": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-06,
        rope_theta=1000000, tie_word_embeddings=True),
    "vae": dict(latent_channels=32, block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
        sample_size=1024),
}


class Flux2KleinPolicy(PipelinePolicy):
    """FLUX.2 Klein: Qwen3 prompt embeddings (the pipeline's hidden layers), latents kept as the pipeline's
    patchified ``[4C, H/16, W/16]`` grid and packed into tokens with its position ids for each transformer call,
    decoded with the VAE's batch-norm statistics, sampled on the pipeline's grid for the policy's resolution
    (``Flux2Grid(image_seq_len)``). Arguments: :class:`PipelinePolicy`'s (``model`` defaults to Klein base 4B).
    """

    hub_id = FLUX2_KLEIN
    pipeline_class = Flux2KleinPipeline
    frozen = ("text_encoder", "vae")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.pipeline.config.is_distilled and self.guidance_scale > 1:
            raise ValueError("this FLUX.2 Klein checkpoint is step-distilled and ignores guidance: set guidance_scale 1")

    @staticmethod
    def build(size: Size = "tiny", depth: int | None = None) -> Flux2KleinPipeline:
        """FLUX.2 Klein base 4B: a FLUX.2 transformer (5 double + 20 single blocks, 128 latent channels) reading
        Qwen3-4B's hidden layers 9 / 18 / 27 (so the text encoder keeps at least 28 layers whatever ``depth``), the
        FLUX.2 VAE with batch-norm latent statistics (set away from (0, 1) so that decoding is tested with them),
        and Klein's scheduler (dynamic exponential shift, mu from the pipeline)."""
        tokenizer = qwen3_tokenizer()
        if size == "tiny":
            qwen = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=28,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8)
            transformer = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32,
                               axes_dims_rope=(4, 4, 4, 4))
            vae = dict(TINY_VAE, latent_channels=4)
        else:
            real = PUBLISHED
            qwen = real["text_encoder"] | capped(real["text_encoder"], "num_hidden_layers", depth, floor=28)
            transformer = real["transformer"] | capped(real["transformer"], "num_layers", depth) \
                | capped(real["transformer"], "num_single_layers", depth)
            vae = dict(real["vae"])
        blocks = len(vae["block_out_channels"])
        vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * blocks,
                                 up_block_types=("UpDecoderBlock2D",) * blocks, **vae)
        vae.bn.running_mean.normal_(0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
        return Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
            ),
            vae=vae,
            text_encoder=Qwen3ForCausalLM(Qwen3Config(**{"max_position_embeddings": 1024, "tie_word_embeddings": True}
                                                      | qwen)),
            tokenizer=tokenizer,
            transformer=Flux2Transformer2DModel(**{"patch_size": 1, "guidance_embeds": False} | transformer),
            is_distilled=False,
        )

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
