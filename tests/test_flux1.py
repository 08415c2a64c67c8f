"""FLUX.1-dev's own parts on a tiny random FluxPipeline (parity, its recipe and LoRA export: test_base_models.py):
its guidance is an embedded input, a model without the embedding is refused, its FSDP2 shard units."""

import pytest
import torch
from diffusers import FluxPipeline

from precise_lightning.architectures.parts import TINY_RESOLUTION
from precise_lightning.policies import FluxPolicy
from precise_lightning.sampling import FluxGrid

PROMPTS = ["a red cube on a wooden table", "a photo of a cat wearing a small hat"]


def test_guidance_is_an_input_and_schnell_is_refused(model_root, tmp_path):
    policy = FluxPolicy(resolution=TINY_RESOLUTION)
    assert isinstance(policy.default_grid(), FluxGrid) and policy.guidance_scale == 1.0 and policy.guidance == 3.5
    x, t = torch.randn(2, *policy.latent_shape), torch.tensor(0.6)
    with torch.no_grad():
        cond = policy.encode(PROMPTS)
        v = policy.velocity(x, t, cond)
        policy.guidance = 1.0
        assert not torch.allclose(v, policy.velocity(x, t, cond))  # one forward, the guidance embedded
    pipe = FluxPipeline.from_pretrained(model_root / FluxPolicy.hub_id)
    pipe.transformer.register_to_config(guidance_embeds=False)
    pipe.save_pretrained(tmp_path / "schnell")
    with pytest.raises(ValueError, match="no guidance embedding"):
        FluxPolicy(model=str(tmp_path / "schnell"), resolution=TINY_RESOLUTION)
    with pytest.raises(ValueError, match="guidance must be > 0"):
        FluxPolicy(guidance=0.0)  # refused before any weights load


def test_fsdp2_shards_each_double_and_single_block(model_root):
    """The shard units FSDP2 wraps one by one are the transformer's blocks (with LoRA: the base model's)."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    policy = FluxPolicy(resolution=TINY_RESOLUTION, lora_rank=4, lora_targets=["to_q", "to_k", "to_v", "to_out.0"])
    units = policy.shard_units(policy.denoiser)
    config = policy.pipeline.transformer.config
    assert len(units) == config.num_layers + config.num_single_layers == 2
    assert [type(u) for u in units] == [FluxTransformerBlock, FluxSingleTransformerBlock]
