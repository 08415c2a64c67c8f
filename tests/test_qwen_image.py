"""Qwen-Image's own parts on a tiny random QwenImagePipeline (parity, its recipe and LoRA export:
test_base_models.py): the norm-rescaled guidance, prompts and negative encoded to one length, its grid's terminal
stretch, its FSDP2 shard units."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

from precise_lightning.architectures.parts import TINY_RESOLUTION
from precise_lightning.policies import QwenImagePolicy
from precise_lightning.policies.qwen_image import PUBLISHED
from precise_lightning.sampling import FluxGrid, flux_mu

PROMPTS = ["a red cube on a wooden table", "a photo of a cat wearing a small hat"]


def _packed(v: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], QwenImagePipeline._pack_latents transcribed."""
    b, c, h, w = v.shape
    return v.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def test_guidance_is_cfg_rescaled_to_the_conditional_norm_per_token(model_root):
    """QwenImagePipeline.__call__ (and Flow-GRPO's compute_log_prob): comb = neg + w (cond - neg), then
    comb * |cond| / |comb| with norms over each packed token's 4C values."""
    policy = QwenImagePolicy(resolution=TINY_RESOLUTION, guidance_scale=4.0)
    g = torch.Generator().manual_seed(0)
    v_uncond, v_cond = (torch.randn(2, *policy.latent_shape, generator=g) for _ in range(2))
    comb = _packed(v_uncond) + 4.0 * (_packed(v_cond) - _packed(v_uncond))
    expected = comb * (torch.norm(_packed(v_cond), dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    guided = policy.guide(v_uncond, v_cond)
    torch.testing.assert_close(_packed(guided), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(guided, v_uncond + 4.0 * (v_cond - v_uncond), atol=1e-3)  # the rescale matters


def test_prompts_and_negative_share_one_length_and_equal_their_separate_encodings(model_root):
    """Encoded in one batch (one forward for both CFG halves), each prompt's valid embeddings equal the pipeline's
    encoding of it alone; the padding is zeros with a False mask."""
    policy = QwenImagePolicy(resolution=TINY_RESOLUTION, guidance_scale=4.0, negative_prompt=" ")
    prompts = ["a cat", "a photo of a dog wearing a small hat on a sunny beach"]
    cond = policy.encode(prompts)
    assert cond["embeds"].shape[1] == cond["neg_embeds"].shape[1] == cond["mask"].shape[1]
    for i, text in enumerate([*prompts, " "]):
        alone, mask = policy.pipeline.encode_prompt(prompt=[text], max_sequence_length=512)
        key, row = ("embeds", i) if i < len(prompts) else ("neg_embeds", 0)
        valid = cond[key.replace("embeds", "mask")][row]
        assert int(valid.sum()) == alone.shape[1] and (mask is None or mask.all())
        torch.testing.assert_close(cond[key][row][valid], alone[0], rtol=0, atol=1e-6)
        assert not cond[key][row][~valid].any()
    assert not cond["mask"][0].all()  # the short prompt is padded


@pytest.mark.parametrize("resolution", [512, 1024, 1328])
def test_grid_equals_the_qwen_image_scheduler_with_its_terminal_stretch(resolution):
    """FluxGrid with Qwen-Image's scheduler config equals its FlowMatchEulerDiscreteScheduler's sigmas."""
    config = PUBLISHED["scheduler"]
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    tokens = (resolution // 16) ** 2
    mu = flux_mu(tokens, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                 config["max_shift"])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 10, 10), mu=mu)
    grid = FluxGrid(tokens, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                    config["max_shift"], config["shift_terminal"])(10)
    torch.testing.assert_close(grid.float(), scheduler.sigmas, rtol=0, atol=1e-6)
    assert grid[-2] == pytest.approx(config["shift_terminal"]) and grid[0] == 1


def test_fsdp2_shards_each_transformer_block(model_root):
    policy = QwenImagePolicy(resolution=TINY_RESOLUTION, lora_rank=4, lora_targets=["to_q", "to_k", "to_v"])
    units = policy.shard_units(policy.denoiser)
    assert len(units) == policy.pipeline.transformer.config.num_layers == 2
    assert all(type(u) is QwenImageTransformerBlock for u in units)
