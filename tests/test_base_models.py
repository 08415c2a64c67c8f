"""Every model policy on a diffusers pipeline (the registry, ``pipeline_policies()``), on tiny random pipelines of
the same classes: stock-pipeline parity, LoRA round trip into a stock pipeline, its recipe config trained for two
iterations on CPU, full fine-tuning with a KL reference, the SD3.5 recipe with every rival sampler, the
missing-weights message. A new policy file is picked up here without editing a list."""

import math
from pathlib import Path

import pytest
import torch
import yaml

import cli
from conftest import ROOT, Model, model_recipes, run_dir, scalars
from precise_lightning.architectures.parts import TINY_RESOLUTION
from precise_lightning.hub import WeightsNotFoundError
from precise_lightning.policies import SD3Policy
from precise_lightning.sampling import Sampler, SD3Grid

PROMPTS = ["a red cube on a wooden table", "a photo of a cat wearing a small hat"]


ALL = model_recipes()
SD35 = next(m for m in ALL if m.policy is SD3Policy)
MODELS = pytest.mark.parametrize("m", ALL, ids=[Path(m.config).stem for m in ALL])
# Generic code run per model (training runs, checkpointing, dtypes, offload): SD3.5 in the inner loop, the
# other models in the slow tier.
SD35_FAST = pytest.mark.parametrize("m", [pytest.param(m, marks=() if m is SD35 else pytest.mark.slow) for m in ALL],
                                    ids=[Path(m.config).stem for m in ALL])


def _policy_image(m: Model, policy, noise: torch.Tensor, steps: int) -> torch.Tensor:
    sampler = Sampler("ode", num_steps=steps, grid=policy.default_grid())
    with torch.no_grad():
        cond = policy.encode(PROMPTS)
        latents = sampler.sample(lambda x, t: policy.velocity(x, t, cond), noise).latents[-1]
        return policy.decode(latents)


def _stock_image(pipe, policy, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """The stock pipeline's image from the same initial noise, with the policy's guidance and prompt length."""
    return pipe(prompt=PROMPTS, height=TINY_RESOLUTION, width=TINY_RESOLUTION, num_inference_steps=steps,
                output_type="pt", **policy.pipeline_call_arguments(noise.clone())).images


@MODELS
@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_ode_rollout_equals_the_stock_pipeline(model_root, m, guidance):
    """Same weights, grid, noise and guidance: the policy's ODE rollout + decode is the pipeline's image."""
    policy = m.policy(resolution=TINY_RESOLUTION, guidance_scale=guidance)
    pipe = m.pipeline.from_pretrained(model_root / m.hub_id)
    noise = torch.randn(len(PROMPTS), *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    ours, stock = _policy_image(m, policy, noise, 10), _stock_image(pipe, policy, noise, 10)
    assert ours.shape == stock.shape == (2, 3, TINY_RESOLUTION, TINY_RESOLUTION)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)  # float32 on CPU; differences are op ordering
    assert ours.std() > 0.01  # not a constant image


@MODELS
def test_guidance_is_one_batched_forward_of_both_halves(model_root, m):
    """The guided velocity (both halves in one padded forward) is ``guide`` of the two velocities computed apart;
    linear guidance is the formula itself (Qwen-Image's rescaled one: tests/test_qwen_image.py)."""
    policy = m.policy(resolution=TINY_RESOLUTION, guidance_scale=3.0)
    x = torch.randn(2, *policy.latent_shape)
    t = torch.tensor(0.7)
    with torch.no_grad():
        cond = policy.encode(PROMPTS)
        guided = policy.velocity(x, t, cond)
        policy.guidance_scale = 1.0
        v_cond = policy.velocity(x, t, cond)
        v_uncond = policy.velocity(x, t, {k.removeprefix("neg_"): v for k, v in cond.items() if k.startswith("neg_")})
    policy.guidance_scale = 3.0
    torch.testing.assert_close(guided, policy.guide(v_uncond, v_cond), rtol=1e-5, atol=1e-5)
    if m.linear_guidance:
        torch.testing.assert_close(guided, v_uncond + 3.0 * (v_cond - v_uncond), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [m for m in ALL if m.linear_guidance], ids=lambda m: Path(m.config).stem)
def test_detached_unconditional_half_leaves_only_the_conditional_gradient(model_root, m):
    """With detach_uncond the guided velocity is unchanged and its gradient is w * grad(v_cond) (the unconditional
    half a constant), Flow-GRPO's update; without it the unconditional half's gradient (1 - w) grad(v_uncond) adds."""
    lora = dict(resolution=TINY_RESOLUTION, lora_rank=4, lora_targets=["to_q", "to_k", "to_v"])
    t, w = torch.tensor(0.6), 4.5
    grads, values = {}, {}
    for detach in (True, False):
        torch.manual_seed(0)
        policy = m.policy(guidance_scale=w, detach_uncond=detach, **lora)
        with torch.no_grad():
            for p in policy.trainable_parameters():
                p.normal_(0, 0.1)  # LoRA B starts at 0: give both halves a gradient path
        x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
        weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
        cond = policy.encode(PROMPTS)
        v = policy.velocity(x, t, cond)
        grads[detach] = torch.autograd.grad((v * weight).sum(), policy.trainable_parameters())
        values[detach] = v.detach()
        if detach:
            policy.guidance_scale = 1.0
            v_cond = policy.velocity(x, t, {k: c for k, c in cond.items() if not k.startswith("neg_")})
            expected = torch.autograd.grad((w * v_cond * weight).sum(), policy.trainable_parameters())
    torch.testing.assert_close(values[True], values[False])
    for got, want in zip(grads[True], expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(grads[True], grads[False]))


def _recipe(m: Model, tmp_path, *extra):
    return ["--config", m.config, "--config", "configs/tiny_cpu.yaml",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra]


@pytest.mark.slow
@MODELS
def test_recipe_trains_two_iterations_and_its_lora_loads_into_a_stock_pipeline(tmp_path, model_root, m):
    # A larger learning rate than the recipes' so that two iterations change the image well beyond the parity
    # tolerance (Klein's 8e-5 moves it by < 1e-4); everything else is the recipe.
    run = cli.main(_recipe(m, tmp_path, "--model_root", str(model_root), "--model.optimizer.init_args.lr", "0.01"),
                   run=False)
    policy = run.model.policy
    assert isinstance(policy, m.policy) and policy.guidance_scale == m.guidance and policy.lora_rank == m.lora_rank
    lora = {n: p.detach().clone() for n, p in policy.named_trainable_parameters()}
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step == 4
    params = dict(policy.named_parameters())
    unmoved = [n for n in lora if "lora_B" in n and torch.equal(lora[n], params[n])]
    # Every adapter moved but those with no gradient path: the text stream of the last joint block, whose text
    # outputs are discarded (SD3's context_pre_only block: its context queries; Qwen-Image's: its text queries,
    # text output projection and text MLP). FLUX's single blocks read the last double block's text stream.
    last = f"transformer_blocks.{len(policy.pipeline.transformer.transformer_blocks) - 1}."
    text_stream = ("add_q_proj", "to_add_out", "txt_mlp")
    assert all(last in n and any(k in n for k in text_stream) for n in unmoved), unmoved
    assert len(unmoved) < len([n for n in lora if "lora_B" in n])
    assert all(torch.equal(frozen[n], params[n]) for n in frozen)  # base weights, encoders and VAE untouched
    version = run_dir(tmp_path)
    logged = scalars(version)
    assert logged["train/ratio_drift_first"] == [0.0, 0.0]  # ratio exactly 1 before each iteration's first update
    rewards, held_out = m.recipe["reward"]["rewards"], m.recipe["reward"].get("metrics") or {}
    extra = m.recipe["model"].get("extra_eval_samplers") or {}
    for tag in ["train/reward", "train/approx_kl", "eval/reward", *[f"eval/{name}/reward" for name in extra],
                *[f"{split}/reward_{name}" for name in rewards for split in ("train", "eval")],
                *[f"eval/{name}" for name in held_out]]:
        assert tag in logged and all(math.isfinite(v) for v in logged[tag]), tag
    # Checkpoints keep the trainable weights only; a freshly built run restores them (strict loading).
    run.trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert {k for k in saved if k.startswith("policy.")} == {f"policy.{n}" for n in lora}
    again = cli.main(_recipe(m, tmp_path / "again", "--model_root", str(model_root)), run=False)
    again.trainer.validate(again.model, datamodule=again.datamodule, ckpt_path=tmp_path / "last.ckpt", verbose=False)
    restored = dict(again.model.policy.named_trainable_parameters())
    assert all(torch.equal(restored[n], params[n]) for n in lora)
    # The adapters DiffusersExport wrote in diffusers' format reproduce the trained policy in a stock pipeline.
    assert (version / "lora_ema").is_dir()
    pipe = m.pipeline.from_pretrained(model_root / m.hub_id)
    pipe.load_lora_weights(version / "lora")
    noise = torch.randn(len(PROMPTS), *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    trained = _stock_image(pipe, policy, noise, 6)
    torch.testing.assert_close(_policy_image(m, policy, noise, 6), trained, rtol=0, atol=1e-5)
    base = m.pipeline.from_pretrained(model_root / m.hub_id)
    assert (_stock_image(base, policy, noise, 6) - trained).abs().max() > 1e-3  # the LoRA matters


@pytest.mark.slow  # bf16 autocast on a CPU: 9 s (the inner loop fits SD3.5 in the full fine-tuning test)
@MODELS
def test_recipe_runs_in_bf16_mixed_with_ratio_exactly_one(tmp_path, model_root, m):
    """Rollout and re-scoring compute identically under autocast; log-probs stay float32. The sampler is Precise-2M
    (its stored previous x0_hat makes re-scoring exact too); the reward is the smoke overlay's JPEG
    compressibility: the recipe with no scorer weights at all."""
    run = cli.main(_recipe(m, tmp_path, "--model_root", str(model_root), "--config", "configs/rewards/jpeg.yaml",
                           "--config", "configs/samplers/precise_2m.yaml",
                           "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "2"), run=False)
    assert run.model.sampler.rule == "precise_2m"
    run.trainer.fit(run.model, datamodule=run.datamodule)
    metrics = run.trainer.callback_metrics
    assert "train/reward_jpeg_compressibility" in metrics and "eval/hpsv2" not in metrics
    assert metrics["train/ratio_drift_first"] == 0 and math.isfinite(metrics["train/grad_norm"])
    policy = run.model.policy
    cond = policy.encode(PROMPTS[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        traj = run.model.sampler.sample(lambda x, t: policy.velocity(x, t, cond),
                                        torch.randn(2, *policy.latent_shape))
    assert traj.log_probs.dtype == torch.float32 and torch.isfinite(traj.log_probs).all()


@SD35_FAST
def test_full_fine_tuning_with_a_kl_reference(tmp_path, model_root, m):
    run = cli.main(_recipe(m, tmp_path, "--model_root", str(model_root), "--model.policy.init_args.lora_rank", "0",
                           "--trainer.max_steps", "2", "--model.beta", "0.1"), run=False)
    policy = run.model.policy
    assert policy.reference_denoiser is not None  # a frozen copy: full fine-tuning has no adapters to disable
    before = {n: p.detach().clone() for n, p in policy.denoiser.named_parameters()}
    run.trainer.fit(run.model, datamodule=run.datamodule)
    changed = [n for n, p in policy.denoiser.named_parameters() if not torch.equal(before[n], p)]
    assert changed and all(p.requires_grad for p in policy.denoiser.parameters())
    assert all(torch.equal(before[n], p) for n, p in policy.reference_denoiser.named_parameters())
    assert math.isfinite(run.trainer.callback_metrics["train/kl"])
    with pytest.raises(ValueError, match="save_lora needs LoRA adapters"):
        policy.save_lora(tmp_path / "lora")
    # DiffusersExport wrote the fine-tuned transformer; as a stock pipeline's transformer it gives the policy's image.
    (version,) = list(tmp_path.glob("*/version_*"))
    transformer = type(policy.pipeline.transformer).from_pretrained(version / "transformer")
    pipe = m.pipeline.from_pretrained(model_root / m.hub_id, transformer=transformer)
    noise = torch.randn(len(PROMPTS), *policy.latent_shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_policy_image(m, policy, noise, 4), _stock_image(pipe, policy, noise, 4),
                               rtol=0, atol=1e-5)


SAMPLER_OVERLAYS = {  # overlay: (rule, eta, ratio_norm, clip_range, stochastic steps of a 10-step grid)
    "precise": ("precise", 1.5, True, 4e-6, list(range(9))),
    "flow_grpo": ("flow_sde", 0.7, False, 1e-4, list(range(9))),
    "dance_grpo": ("dance_sde", 0.3, False, 1e-4, list(range(9))),
    "cps": ("cps", 0.7, False, 1e-4, list(range(9))),
    "mixgrpo": ("flow_sde", 0.7, False, 1e-4, [0, 1, 2, 3]),
    "precise_2m": ("precise_2m", 1.5, True, 4e-6, list(range(9))),
}


@pytest.mark.parametrize("overlay", SAMPLER_OVERLAYS)
def test_sampler_overlays_set_the_sampler_and_its_published_ppo_settings(overlay, capsys):
    """Each overlay on the SD3.5 recipe: the rule, its noise, its PPO settings; the recipe's steps stay and its grid
    stays the policy's (no grid of its own: test_policy_grid_is_the_pipeline_scheduler_s checks which)."""
    with pytest.raises(SystemExit):
        cli.main(["fit", "--config", SD35.config, "--config", f"configs/samplers/{overlay}.yaml", "--print_config"])
    parsed = yaml.safe_load(capsys.readouterr().out)["model"]
    sampler = Sampler(**parsed["sampler"]["init_args"])
    rule, eta, ratio_norm, clip_range, steps = SAMPLER_OVERLAYS[overlay]
    assert (sampler.rule, sampler.eta, sampler.num_steps, sampler.grid) == (rule, eta, 10, None)
    assert (parsed["ratio_norm"], parsed["clip_range"], sampler.sde_steps) == (ratio_norm, clip_range, steps)


def test_policy_grid_is_the_pipeline_scheduler_s(tmp_path, model_root):
    """A sampler without a grid samples on the policy's: SD3.5's scheduler grid, shift 3."""
    run = cli.main(_recipe(SD35, tmp_path, "--model_root", str(model_root)), run=False)
    torch.testing.assert_close(run.model.sampler.timesteps, SD3Grid(3.0)(10), rtol=0, atol=0)
    assert run.model.eval_sampler.timesteps.shape == (41,)  # its 40-step ODE evaluation, on the same grid family
    torch.testing.assert_close(run.model.eval_sampler.timesteps, SD3Grid(3.0)(40), rtol=0, atol=0)


@MODELS
def test_missing_weights_say_what_and_how(m):
    with pytest.raises(WeightsNotFoundError, match=f"'{m.hub_id}' \\(config key `model.policy.init_args.model`\\)"
                                                   ".*HF_HUB_OFFLINE") as info:
        m.policy()
    assert f"hf download {m.hub_id}" in str(info.value)


@MODELS
def test_resolution_must_fit_the_latent_grid(model_root, m):
    with pytest.raises(ValueError, match=r"resolution \(30\) must be a multiple of 4"):
        m.policy(resolution=30)


@SD35_FAST
def test_gradient_checkpointing_gives_the_same_velocity_and_gradients(model_root, m):
    torch.manual_seed(0)
    plain = m.policy(resolution=TINY_RESOLUTION, lora_rank=4, lora_targets=["to_q", "to_k", "to_v"])
    torch.manual_seed(0)
    checkpointed = m.policy(resolution=TINY_RESOLUTION, lora_rank=4, lora_targets=["to_q", "to_k", "to_v"],
                            gradient_checkpointing=True)
    assert checkpointed.pipeline.transformer.is_gradient_checkpointing
    x, t = torch.randn(2, *plain.latent_shape), torch.tensor(0.6)
    grads = []
    for policy in (plain, checkpointed):
        policy.train()
        assert not any(getattr(policy, c).training for c in policy.frozen)  # no text-encoder dropout
        v = policy.velocity(x, t, policy.encode(PROMPTS))
        v.square().mean().backward()
        grads.append((v.detach(), [p.grad for p in policy.trainable_parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


@SD35_FAST
def test_text_encoders_load_in_text_dtype_the_vae_and_transformer_in_float32(model_root, m):
    """The published trainers' precision: text encoders in the mixed-precision dtype, VAE and transformer float32."""
    policy = m.policy(resolution=TINY_RESOLUTION, text_dtype="bfloat16")
    assert all(next(getattr(policy, c).parameters()).dtype == torch.bfloat16 for c in policy.frozen if c != "vae")
    assert next(policy.vae.parameters()).dtype == torch.float32
    assert next(policy.denoiser.parameters()).dtype == torch.float32
    assert next(m.policy(resolution=TINY_RESOLUTION, vae_dtype="bfloat16").vae.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        v = policy.velocity(torch.randn(2, *policy.latent_shape), torch.tensor(0.5), policy.encode(PROMPTS))
        images = policy.decode(torch.randn(2, *policy.latent_shape))
    assert v.dtype == torch.float32 and torch.isfinite(v).all() and images.dtype == torch.float32


def test_sd35_recipe_adapts_exactly_flow_grpo_s_modules(model_root):
    """The recipe's qualified names adapt the joint attention only; bare names would also reach the dual-attention
    block's attn2 (the tiny model's block 0 has one, as SD3.5 Medium's first 13 blocks do)."""
    recipe = yaml.safe_load((ROOT / "configs/sd35_precise.yaml").read_text())["model"]["policy"]["init_args"]
    adapted = lambda targets: [n.removeprefix("base_model.model.") for n, module in  # noqa: E731
                               SD3Policy(resolution=TINY_RESOLUTION, lora_rank=4, lora_targets=targets)
                               .denoiser.named_modules() if hasattr(module, "lora_A")]
    ours = adapted(recipe["lora_targets"])
    # block 0: q, k, v, out, add_q, add_k, add_v, add_out; block 1 (context_pre_only) has no to_add_out
    assert len(ours) == 15 and not [n for n in ours if ".attn2." in n]
    bare = adapted([name.removeprefix("attn.") for name in recipe["lora_targets"]])
    assert sorted(n for n in bare if ".attn2." not in n) == sorted(ours) and len(bare) == 19  # + attn2 q, k, v, out


@SD35_FAST
def test_text_encoders_off_the_gpu_encode_the_same_and_wait_in_host_memory(model_root, m):
    """``offload_text_encoders``: the encoders are on the policy's device while they encode, in host memory after."""
    torch.manual_seed(0)
    kept = m.policy(resolution=TINY_RESOLUTION, guidance_scale=m.guidance)
    torch.manual_seed(0)
    offloaded = m.policy(resolution=TINY_RESOLUTION, guidance_scale=m.guidance, offload_text_encoders=True)
    seen = []
    encode_prompts = offloaded.encode_prompts
    offloaded.encode_prompts = lambda prompts: seen.append(
        {next(e.parameters()).device for e in offloaded.text_encoders}) or encode_prompts(prompts)
    expected, got = kept.encode(PROMPTS), offloaded.encode(PROMPTS)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert seen and all(devices == {offloaded.device} for devices in seen)
    assert all(next(e.parameters()).device.type == "cpu" for e in offloaded.text_encoders)
    assert len(offloaded.text_encoders) == len([c for c in m.policy.frozen if c.startswith("text_encoder")]) >= 1


@pytest.mark.parametrize("m", ALL, ids=[Path(m.config).stem for m in ALL])
def test_a_policy_is_found_by_its_short_class_path(m, capsys):
    """Every module of precise_lightning.policies is imported by the package: no list to edit for a new model."""
    with pytest.raises(SystemExit):
        cli.main(["fit", "--config", m.config, "--model.policy.class_path", m.policy.__name__, "--print_config"])
    parsed = yaml.safe_load(capsys.readouterr().out)
    assert parsed["model"]["policy"]["class_path"] == f"precise_lightning.policies.{m.policy.__name__}"
