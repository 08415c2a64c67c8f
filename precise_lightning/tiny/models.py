"""Tiny random base models of the published classes, saved as diffusers pipeline directories under the hub id:
Stable Diffusion 3.5 Medium (SD3 transformer with dual attention and RMS q/k norm, three text encoders, a VAE with
scaling and shift) and FLUX.2 Klein base (FLUX.2 transformer, a 28-layer Qwen3 whose hidden layers 9 / 18 / 27 the
pipeline reads, the FLUX.2 VAE with batch-norm latent statistics)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
)

from precise_lightning.tiny.rewards import Size
from precise_lightning.tiny.tokenizers import clip_tokenizer, qwen3_tokenizer, t5_tokenizer

SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"
FLUX2_KLEIN = "black-forest-labs/FLUX.2-klein-base-4B"
FLUX1_DEV = "black-forest-labs/FLUX.1-dev"
PUBLISHED = Path(__file__).parent / "published"
TINY_RESOLUTION = 32  # pixels; the tiny VAE halves it once, the transformer's 2x2 patches halve it again


def _clip_text(**config: Any) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(**config))


def _tiny_clip_text(hidden: int, act: str) -> CLIPTextModelWithProjection:
    return _clip_text(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                      projection_dim=hidden, vocab_size=49408, max_position_embeddings=77, hidden_act=act)


def published(hub_id: str) -> dict[str, dict[str, Any]]:
    """The published architecture of each component of ``hub_id`` (``published/<name>.json``, with its source)."""
    return json.loads((PUBLISHED / f"{hub_id.split('/')[-1]}.json").read_text())


# The tiny VAE keeps the published scaling, shift and (absent) quant convs, so decoding is tested with them.
SD35_VAE = {k: v for k, v in published(SD35_MEDIUM)["vae"].items()
            if k in ("in_channels", "out_channels", "scaling_factor", "shift_factor", "use_quant_conv",
                     "use_post_quant_conv")}


def _capped(config: dict[str, Any], key: str, depth: int | None, floor: int = 0) -> dict[str, Any]:
    """``{key: config[key]}`` capped at ``depth`` layers (never below ``floor``)."""
    return {key: config[key] if depth is None else max(floor, min(config[key], depth))}


def sd35_pipeline(size: Size = "tiny", depth: int | None = None) -> StableDiffusion3Pipeline:
    """SD3.5 Medium: CLIP-L / CLIP-G / T5 text encoders whose CLIP embeddings are concatenated and padded to T5's
    width (joint_attention_dim), pooled CLIP-L + CLIP-G. ``size="real"`` is the published architecture (2.5B
    transformer, T5-XXL), ``depth`` caps every layer stack (for machines where the full depth does not fit)."""
    tokenizer_3 = t5_tokenizer()
    if size == "tiny":
        clip_l, clip_g = _tiny_clip_text(16, "quick_gelu"), _tiny_clip_text(16, "gelu")
        t5 = T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1, vocab_size=len(tokenizer_3))
        transformer = dict(sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, num_layers=2,
                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                           pooled_projection_dim=32, pos_embed_max_size=32, dual_attention_layers=(0,))
        vae = dict(latent_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                   sample_size=TINY_RESOLUTION)
    else:
        real = published(SD35_MEDIUM)
        clip_l = _clip_text(**real["text_encoder"] | _capped(real["text_encoder"], "num_hidden_layers", depth))
        clip_g = _clip_text(**real["text_encoder_2"] | _capped(real["text_encoder_2"], "num_hidden_layers", depth))
        t5 = T5Config(**real["text_encoder_3"] | _capped(real["text_encoder_3"], "num_layers", depth))
        transformer = real["transformer"] | _capped(real["transformer"], "num_layers", depth)
        transformer["dual_attention_layers"] = tuple(i for i in transformer["dual_attention_layers"]
                                                     if i < transformer["num_layers"])
        vae = dict(real["vae"])
    blocks = len(vae["block_out_channels"])
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**{"patch_size": 2, "qk_norm": "rms_norm"} | transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(**SD35_VAE | vae, down_block_types=("DownEncoderBlock2D",) * blocks,
                          up_block_types=("UpDecoderBlock2D",) * blocks),
        text_encoder=clip_l, tokenizer=clip_tokenizer(), text_encoder_2=clip_g, tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=T5EncoderModel(t5), tokenizer_3=tokenizer_3,
    )


def flux2_klein_pipeline(size: Size = "tiny", depth: int | None = None) -> Flux2KleinPipeline:
    """FLUX.2 Klein base 4B: a FLUX.2 transformer (5 double + 20 single blocks, 128 latent channels) reading
    Qwen3-4B's hidden layers 9 / 18 / 27 (so the text encoder keeps at least 28 layers whatever ``depth``), the
    FLUX.2 VAE with batch-norm latent statistics (set away from (0, 1) so that decoding is tested with them), and
    Klein's scheduler (dynamic exponential shift, mu from the pipeline)."""
    tokenizer = qwen3_tokenizer()
    if size == "tiny":
        qwen = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=28,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8)
        transformer = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32,
                           axes_dims_rope=(4, 4, 4, 4))
        vae = dict(latent_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                   sample_size=TINY_RESOLUTION)
    else:
        real = published(FLUX2_KLEIN)
        qwen = real["text_encoder"] | _capped(real["text_encoder"], "num_hidden_layers", depth, floor=28)
        transformer = real["transformer"] | _capped(real["transformer"], "num_layers", depth) \
            | _capped(real["transformer"], "num_single_layers", depth)
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
        text_encoder=Qwen3ForCausalLM(Qwen3Config(**{"max_position_embeddings": 1024, "tie_word_embeddings": True} | qwen)),
        tokenizer=tokenizer,
        transformer=Flux2Transformer2DModel(**{"patch_size": 1, "guidance_embeds": False} | transformer),
        is_distilled=False,
    )


def flux1_dev_pipeline(size: Size = "tiny", depth: int | None = None) -> FluxPipeline:
    """FLUX.1-dev: a FLUX.1 transformer (19 double + 38 single blocks, guidance distilled: the guidance is an input
    embedding), CLIP-L (pooled) and T5-XXL, the 16-channel VAE with scaling and shift, the scheduler's dynamic shift."""
    tokenizer_2 = t5_tokenizer()
    if size == "tiny":
        clip = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    projection_dim=16, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
        t5 = T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1, vocab_size=len(tokenizer_2))
        transformer = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                           axes_dims_rope=(2, 2, 4))
        vae = dict(latent_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                   sample_size=TINY_RESOLUTION)
    else:
        real = published(FLUX1_DEV)
        clip = real["text_encoder"] | _capped(real["text_encoder"], "num_hidden_layers", depth)
        t5 = T5Config(**real["text_encoder_2"] | _capped(real["text_encoder_2"], "num_layers", depth))
        transformer = real["transformer"] | _capped(real["transformer"], "num_layers", depth) \
            | _capped(real["transformer"], "num_single_layers", depth)
        vae = dict(real["vae"])
    real_vae = published(FLUX1_DEV)["vae"]  # the tiny VAE keeps the published scaling and shift too
    vae = {k: real_vae[k] for k in ("in_channels", "out_channels", "scaling_factor", "shift_factor",
                                    "use_quant_conv", "use_post_quant_conv")} | vae
    blocks = len(vae["block_out_channels"])
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**published(FLUX1_DEV)["scheduler"]),
        vae=AutoencoderKL(**vae, down_block_types=("DownEncoderBlock2D",) * blocks,
                          up_block_types=("UpDecoderBlock2D",) * blocks),
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip)), tokenizer=clip_tokenizer(),
        text_encoder_2=T5EncoderModel(t5), tokenizer_2=tokenizer_2,
        transformer=FluxTransformer2DModel(**{"patch_size": 1, "guidance_embeds": True} | transformer),
    )


def write_models(root: Path, size: Size = "tiny", depth: int | None = None) -> None:
    sd35_pipeline(size, depth).save_pretrained(root / SD35_MEDIUM)
    flux2_klein_pipeline(size, depth).save_pretrained(root / FLUX2_KLEIN)
    flux1_dev_pipeline(size, depth).save_pretrained(root / FLUX1_DEV)
