"""FLUX.1-dev on a tiny random FluxPipeline: stock-pipeline parity with its embedded guidance, and its recipe trained
for two iterations on CPU with the LoRA export loaded into a stock pipeline."""

import math

import pytest
import torch
from diffusers import FluxPipeline

import cli
from conftest import run_dir, scalars
from precise_lightning.modules import FluxPolicy
from precise_lightning.sampling import FluxGrid, Sampler
from precise_lightning.tiny.models import FLUX1_DEV, TINY_RESOLUTION

PROMPTS = ["a red cube on a wooden table", "a photo of a cat wearing a small hat"]


def _policy_image(policy: FluxPolicy, noise: torch.Tensor, steps: int) -> torch.Tensor:
    sampler = Sampler("ode", num_steps=steps, grid=policy.default_grid())
    with torch.no_grad():
        cond = policy.encode(PROMPTS)
        return policy.decode(sampler.sample(lambda x, t: policy.velocity(x, t, cond), noise).latents[-1])


def _stock_image(pipe: FluxPipeline, noise: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    b, c, h, w = noise.shape
    return pipe(prompt=PROMPTS, height=TINY_RESOLUTION, width=TINY_RESOLUTION, num_inference_steps=steps,
                guidance_scale=guidance, latents=pipe._pack_latents(noise.clone(), b, c, h, w), output_type="pt",
                max_sequence_length=128).images


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_ode_rollout_equals_the_stock_pipeline(model_root, guidance):
    """Same weights, the scheduler's dynamically shifted grid, noise and embedded guidance: the same image."""
    policy = FluxPolicy(resolution=TINY_RESOLUTION, guidance=guidance)
    assert isinstance(policy.default_grid(), FluxGrid) and policy.guidance_scale == 1.0
    pipe = FluxPipeline.from_pretrained(model_root / FLUX1_DEV)
    noise = torch.randn(len(PROMPTS), *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    ours, stock = _policy_image(policy, noise, 10), _stock_image(pipe, noise, 10, guidance)
    assert ours.shape == stock.shape == (2, 3, TINY_RESOLUTION, TINY_RESOLUTION)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    assert ours.std() > 0.01


def test_guidance_is_an_input_and_schnell_is_refused(model_root, tmp_path):
    policy = FluxPolicy(resolution=TINY_RESOLUTION)
    x, t = torch.randn(2, *policy.latent_shape), torch.tensor(0.6)
    with torch.no_grad():
        cond = policy.encode(PROMPTS)
        v = policy.velocity(x, t, cond)
        policy.guidance = 1.0
        assert not torch.allclose(v, policy.velocity(x, t, cond))  # one forward, the guidance embedded
    pipe = FluxPipeline.from_pretrained(model_root / FLUX1_DEV)
    pipe.transformer.register_to_config(guidance_embeds=False)
    pipe.save_pretrained(tmp_path / "schnell")
    with pytest.raises(ValueError, match="no guidance embedding"):
        FluxPolicy(model=str(tmp_path / "schnell"), resolution=TINY_RESOLUTION)


@pytest.mark.slow
def test_recipe_trains_two_iterations_and_its_lora_loads_into_a_stock_pipeline(tmp_path, model_root):
    run = cli.main(["--config", "configs/flux1_dev_hpsv2.yaml", "--config", "configs/tiny_cpu.yaml", "--model_root",
                    str(model_root), "--trainer.logger.init_args.save_dir", str(tmp_path),
                    "--trainer.enable_progress_bar", "false", "--model.optimizer.init_args.lr", "0.01"], run=False)
    policy = run.model.policy
    assert isinstance(policy, FluxPolicy) and policy.guidance == 3.5 and policy.lora_rank == 128
    lora = {n: p.detach().clone() for n, p in policy.named_trainable_parameters()}
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step == 4
    moved = [n for n in lora if "lora_B" in n and not torch.equal(lora[n], dict(policy.named_parameters())[n])]
    assert moved and any("single_transformer_blocks" in n for n in moved)  # to_q/k/v match the single blocks too
    logged = scalars(run_dir(tmp_path))
    assert logged["train/ratio_drift_first"] == [0.0, 0.0]
    for tag in ["train/reward", "train/reward_hpsv2", "eval/reward", "eval/pickscore", "eval/sde/reward"]:
        assert tag in logged and all(math.isfinite(v) for v in logged[tag]), tag
    pipe = FluxPipeline.from_pretrained(model_root / FLUX1_DEV)
    pipe.load_lora_weights(run_dir(tmp_path) / "lora")
    noise = torch.randn(len(PROMPTS), *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    trained = _stock_image(pipe, noise, 6, 3.5)  # on the pipeline's own grid, the policy's default
    torch.testing.assert_close(_policy_image(policy, noise, 6), trained, rtol=0, atol=1e-5)
    base = FluxPipeline.from_pretrained(model_root / FLUX1_DEV)
    assert (_stock_image(base, noise, 6, 3.5) - trained).abs().max() > 1e-3


def test_fsdp2_shards_each_double_and_single_block(model_root):
    """The shard units FSDP2 wraps one by one are the transformer's blocks (with LoRA: the base model's)."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    policy = FluxPolicy(resolution=TINY_RESOLUTION, lora_rank=4, lora_targets=["to_q", "to_k", "to_v", "to_out.0"])
    units = policy.shard_units(policy.denoiser)
    config = policy.pipeline.transformer.config
    assert len(units) == config.num_layers + config.num_single_layers == 2
    assert [type(u) for u in units] == [FluxTransformerBlock, FluxSingleTransformerBlock]
