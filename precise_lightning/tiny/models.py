"""Tiny random base models of the published classes, saved as diffusers pipeline directories under the hub id:
Stable Diffusion 3.5 Medium (SD3 transformer with dual attention and RMS q/k norm, three text encoders, a VAE with
scaling and shift) and FLUX.2 Klein base (FLUX.2 transformer, a 28-layer Qwen3 whose hidden layers 9 / 18 / 27 the
pipeline reads, the FLUX.2 VAE with batch-norm latent statistics)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, Qwen3Config, Qwen3ForCausalLM, T5Config, T5EncoderModel

from precise_lightning.tiny.tokenizers import clip_tokenizer, qwen3_tokenizer, t5_tokenizer

SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"
FLUX2_KLEIN = "black-forest-labs/FLUX.2-klein-base-4B"
TINY_RESOLUTION = 32  # pixels; the tiny VAE halves it once, the transformer's 2x2 patches halve it again


def _clip_text(hidden: int) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
        projection_dim=hidden, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu",
    ))


def sd35_pipeline() -> StableDiffusion3Pipeline:
    """SD3.5 Medium's layout at toy width: CLIP-L / CLIP-G / T5 text encoders whose CLIP embeddings are
    concatenated (16 + 16) and padded to T5's width (32 = joint_attention_dim), pooled 16 + 16 = 32."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer, tokenizer_2 = clip_tokenizer(Path(scratch)), clip_tokenizer(Path(scratch), pad_token="!")
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=TINY_RESOLUTION // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
            pooled_projection_dim=32, pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
            sample_size=TINY_RESOLUTION, scaling_factor=1.5305, shift_factor=0.0609,
            use_quant_conv=False, use_post_quant_conv=False,
        ),
        text_encoder=_clip_text(16), tokenizer=tokenizer, text_encoder_2=_clip_text(16), tokenizer_2=tokenizer_2,
        text_encoder_3=T5EncoderModel(T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1,
                                               vocab_size=len(t5_tokenizer()))),
        tokenizer_3=t5_tokenizer(),
    )


def flux2_klein_pipeline() -> Flux2KleinPipeline:
    """FLUX.2 Klein base's layout at toy width; the scheduler is Klein's (dynamic exponential shift, mu from the
    pipeline). The VAE's latent statistics are set away from (0, 1) so that decoding is tested with them."""
    tokenizer = qwen3_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, tie_word_embeddings=True,
    ))
    vae = AutoencoderKLFlux2(
        latent_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=TINY_RESOLUTION,
    )
    vae.bn.running_mean.normal_(0, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
        ),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
        ),
        is_distilled=False,
    )


def write_models(root: Path) -> None:
    sd35_pipeline().save_pretrained(root / SD35_MEDIUM)
    flux2_klein_pipeline().save_pretrained(root / FLUX2_KLEIN)
