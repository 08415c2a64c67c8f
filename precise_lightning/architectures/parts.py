"""What the base models' random builders share (each builder, with its model's published component configs, lives
with its policy in ``precise_lightning.policies``): a layer cap for machines where the full depth does not fit, the
tiny VAE sizes, CLIP text towers and the SD-style VAE."""

from __future__ import annotations

from typing import Any, Literal

from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

Size = Literal["tiny", "real"]
TINY_RESOLUTION = 32  # pixels; the tiny VAE halves it once, the transformer's 2x2 patches halve it again
# The text encoders SD3.5 Medium and FLUX.1-dev share, as their config.json files publish them (SD3.5: text_encoder/
# and text_encoder_3/; FLUX.1-dev: text_encoder/ and text_encoder_2/): CLIP ViT-L/14's text tower and T5 v1.1 XXL.
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
              vocab_size=32128)
TINY_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=TINY_RESOLUTION)


def capped(config: dict[str, Any], key: str, depth: int | None, floor: int = 0) -> dict[str, Any]:
    """``{key: config[key]}`` capped at ``depth`` layers (never below ``floor``)."""
    return {key: config[key] if depth is None else max(floor, min(config[key], depth))}


def clip_text(**config: Any) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(**config))


def tiny_clip_text(hidden: int, act: str) -> CLIPTextModelWithProjection:
    return clip_text(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                     projection_dim=hidden, vocab_size=49408, max_position_embeddings=77, hidden_act=act)


def kl_vae(published: dict[str, Any], vae: dict[str, Any]) -> AutoencoderKL:
    """An ``AutoencoderKL`` with the ``published`` VAE's channels, scaling, shift and (absent) quant convs (so decoding
    is tested with them) and ``vae``'s sizes."""
    vae = {k: published[k] for k in ("in_channels", "out_channels", "scaling_factor", "shift_factor", "use_quant_conv",
                                "use_post_quant_conv")} | vae
    blocks = len(vae["block_out_channels"])
    return AutoencoderKL(**vae, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks)
