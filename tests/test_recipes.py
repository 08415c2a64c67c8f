"""Each recipe config against a table of the published run's values, each row citing its source. The config is
parsed as the command line parses it (every default filled in, nothing loaded): changing a value in a config, or a
default it relies on, without changing the table fails here. Differences from the published code are listed in the
README's recipe table, not here."""

import pytest
import yaml

import cli

FLOW_GRPO = "yifan123/flow_grpo"
PRECISE = "Tencent-Hunyuan/Precise"
SD35_LORA = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out"]
KLEIN_LORA = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.to_qkv_mlp_proj", "attn.add_k_proj",
              "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out",
              "ff_context.linear_in", "ff_context.linear_out"]

# (dotted key in the parsed config, published value, source)
SD35 = [
    ("model.policy.init_args.model", "stabilityai/stable-diffusion-3.5-medium", f"{FLOW_GRPO} config/grpo.py"),
    ("model.policy.init_args.resolution", 512, f"{FLOW_GRPO} config/grpo.py pickscore_sd3"),
    ("model.policy.init_args.guidance_scale", 4.5, f"{FLOW_GRPO} config/grpo.py sample.guidance_scale"),
    ("model.policy.init_args.detach_uncond", True, f"{FLOW_GRPO} scripts/train_sd3.py compute_log_prob"),
    ("model.policy.init_args.negative_prompt", "", f"{FLOW_GRPO} scripts/train_sd3.py neg_prompt_embed"),
    ("model.policy.init_args.max_sequence_length", 128, f"{FLOW_GRPO} scripts/train_sd3.py compute_text_embeddings"),
    ("model.policy.init_args.vae_dtype", "float32", f"{FLOW_GRPO} scripts/train_sd3.py vae.to(float32)"),
    ("model.policy.init_args.lora_rank", 32, f"{FLOW_GRPO} scripts/train_sd3.py LoraConfig"),
    ("model.policy.init_args.lora_alpha", 64.0, f"{FLOW_GRPO} scripts/train_sd3.py LoraConfig"),
    ("model.policy.init_args.lora_targets", SD35_LORA, f"{FLOW_GRPO} scripts/train_sd3.py target_modules"),
    ("model.sampler.init_args.num_steps", 10, f"{FLOW_GRPO} config/grpo.py sample.num_steps"),
    ("model.eval_sampler.init_args.rule", "ode", f"{FLOW_GRPO} scripts/train_sd3.py eval (pipeline_with_logprob)"),
    ("model.eval_sampler.init_args.num_steps", 40, f"{FLOW_GRPO} config/grpo.py sample.eval_num_steps"),
    ("model.optimizer.init_args.lr", 3e-4, f"{FLOW_GRPO} config/grpo.py train.learning_rate"),
    ("model.optimizer.init_args.betas", [0.9, 0.999], f"{FLOW_GRPO} config/base.py adam_beta1/2"),
    ("model.optimizer.init_args.weight_decay", 1e-4, f"{FLOW_GRPO} config/base.py adam_weight_decay"),
    ("model.optimizer.init_args.eps", 1e-8, f"{FLOW_GRPO} config/base.py adam_epsilon"),
    ("model.clip_range", 4e-6, f"{PRECISE} config/flux2_klein.py train.clip_range (the sampler's PPO settings)"),
    ("model.ratio_norm", True, f"{PRECISE} config/flux2_klein.py config.rationorm (the sampler's PPO settings)"),
    ("model.adv_clip_max", 5.0, f"{FLOW_GRPO} config/base.py train.adv_clip_max"),
    ("model.beta", 0.01, f"{FLOW_GRPO} config/grpo.py train.beta"),
    ("model.kl_form", "flow_grpo", f"{FLOW_GRPO} scripts/train_sd3.py kl_loss / std_dev_t"),
    ("model.std_scope", "global", f"{FLOW_GRPO} config/grpo.py sample.global_std"),
    ("model.updates_per_rollout", 2, f"{FLOW_GRPO} config/grpo.py gradient_accumulation_steps = batches / 2"),
    ("model.drop_zero_advantage", True, f"{FLOW_GRPO} scripts/train_sd3.py (zero-advantage samples filtered)"),
    ("model.inner_epochs", 1, f"{FLOW_GRPO} config/base.py train.num_inner_epochs"),
    ("model.max_grad_norm", 1.0, f"{FLOW_GRPO} config/base.py train.max_grad_norm"),
    ("model.sampler.init_args.log_prob_reduce", "mean", f"{FLOW_GRPO} sd3_sde_with_logprob.py log_prob.mean"),
    ("data.group_size", 24, f"{FLOW_GRPO} config/grpo.py sample.num_image_per_prompt"),
    ("ema.decay", 0.9, f"{FLOW_GRPO} flow_grpo/ema.py, config train.ema"),
    ("ema.every_n_steps", 8, f"{FLOW_GRPO} scripts/train_sd3.py EMAModuleWrapper(update_step_interval=8)"),
    ("ema.warmup", True, f"{FLOW_GRPO} flow_grpo/ema.py get_current_decay"),
    ("reward.rewards.pickscore.class_path", "precise_lightning.rewards.PickScore", f"{FLOW_GRPO} config/grpo.py"),
    ("reward.rewards.pickscore.init_args.dtype", "float32", f"{FLOW_GRPO} flow_grpo/pickscore_scorer.py"),
    ("trainer.precision", "bf16-mixed", f"{FLOW_GRPO} config/grpo.py mixed_precision"),
]

KLEIN = [
    ("model.policy.init_args.model", "black-forest-labs/FLUX.2-klein-base-4B", f"{PRECISE} config/flux2_klein.py"),
    ("model.policy.init_args.revision", "a3b4f4849157f664bdbc776fd7453c2783562f4d", f"{PRECISE} config/flux2_klein.py"),
    ("model.policy.init_args.resolution", 512, f"{PRECISE} config/flux2_klein.py config.resolution"),
    ("model.policy.init_args.guidance_scale", 1.0, f"{PRECISE} config/flux2_klein.py sample.guidance_scale"),
    ("model.policy.init_args.max_sequence_length", 128, f"{PRECISE} precise_sde/train/rl_trainer.py encode_prompt"),
    ("model.policy.init_args.vae_dtype", "float32", f"{PRECISE} precise_sde/train/rl_trainer.py"),
    ("model.policy.init_args.lora_rank", 16, f"{PRECISE} precise_sde/train/adapters.py"),
    ("model.policy.init_args.lora_alpha", 16.0, f"{PRECISE} precise_sde/train/adapters.py"),
    ("model.policy.init_args.lora_targets", KLEIN_LORA, f"{PRECISE} precise_sde/train/adapters.py target_modules"),
    ("model.sampler.init_args.rule", "precise", f"{PRECISE} config/flux2_klein.py sde_type"),
    ("model.sampler.init_args.eta", 1.5, f"{PRECISE} config/flux2_klein.py _default_noise_level"),
    ("model.sampler.init_args.num_steps", 20, f"{PRECISE} config/flux2_klein.py num_steps"),
    ("model.eval_sampler.init_args.rule", "precise", f"{PRECISE} config/flux2_klein.py eval_targets sde_type"),
    ("model.eval_sampler.init_args.eta", 1.5, f"{PRECISE} config/base.py mix_eval_targets noise_level"),
    ("model.eval_sampler.init_args.num_steps", 20, f"{PRECISE} config/flux2_klein.py sample.eval_num_steps"),
    ("trainer.val_check_interval", 50, f"{PRECISE} config/flux2_klein.py eval_freq"),
    ("model.optimizer.init_args.lr", 8e-5, f"{PRECISE} config/flux2_klein.py train.learning_rate"),
    ("model.optimizer.init_args.betas", [0.9, 0.999], f"{PRECISE} config/base.py adam_beta1/2"),
    ("model.optimizer.init_args.weight_decay", 1e-4, f"{PRECISE} config/base.py adam_weight_decay"),
    ("model.optimizer.init_args.eps", 1e-8, f"{PRECISE} config/base.py adam_epsilon"),
    ("model.clip_range", 4e-6, f"{PRECISE} config/flux2_klein.py train.clip_range"),
    ("model.adv_clip_max", 5.0, f"{PRECISE} config/base.py train.adv_clip_max"),
    ("model.beta", 0.0, f"{PRECISE} config/flux2_klein.py train.beta"),
    ("model.kl_form", "precise", f"{PRECISE} precise_sde/train/rl_trainer.py kl_loss"),
    ("model.std_scope", "group", f"{PRECISE} config/flux2_klein.py sample.global_std = False"),
    ("model.ratio_norm", True, f"{PRECISE} config/flux2_klein.py config.rationorm"),
    ("model.updates_per_rollout", 2, f"{PRECISE} config/flux2_klein.py gradient_accumulation = batches // 2"),
    ("model.drop_zero_advantage", True, f"{PRECISE} precise_sde/train/rl_trainer.py zero-advantage filter"),
    ("model.inner_epochs", 1, f"{PRECISE} config/flux2_klein.py train.num_inner_epochs"),
    ("model.max_grad_norm", 1.0, f"{PRECISE} config/base.py train.max_grad_norm"),
    ("data.group_size", 8, f"{PRECISE} config/flux2_klein.py sample.num_image_per_prompt"),
    ("ema.decay", 0.9, f"{PRECISE} precise_sde/core/ema.py"),
    ("ema.every_n_steps", 8, f"{PRECISE} precise_sde/train/rl_trainer.py update_step_interval"),
    ("ema.warmup", True, f"{PRECISE} precise_sde/core/ema.py get_current_decay"),
    ("reward.normalize", True, f"{PRECISE} config/base.py normalize_rewards"),
    ("reward.weights", None, f"{PRECISE} config/base.py mix_reward_fn (weights 1)"),
    ("reward.metrics.imagereward.class_path", "precise_lightning.rewards.ImageReward",
     f"{PRECISE} config/base.py mix_eval_targets"),
    ("trainer.precision", "bf16-mixed", f"{PRECISE} config/flux2_klein.py mixed_precision"),
    ("seed_everything", 42, f"{PRECISE} config/base.py seed"),
]

# Global batch per iteration = processes x data.batch_size.
GLOBAL_BATCH = {"configs/sd35_precise.yaml": 48 * 24, "configs/flux2_klein_precise.yaml": 32 * 8}


def _parsed(configs: str, capsys) -> dict:
    """The complete config that ``--config`` of each file (space-separated, in order) gives."""
    args = [arg for config in configs.split(" --config ") for arg in ("--config", config)]
    with pytest.raises(SystemExit):
        cli.main(["fit", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def _get(config: dict, key: str):
    value = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


@pytest.mark.parametrize("config,table", [("configs/sd35_precise.yaml", SD35), ("configs/flux2_klein_precise.yaml", KLEIN)],
                         ids=["sd35", "flux2_klein"])
def test_recipe_matches_the_published_run(config, table, capsys):
    parsed = _parsed(config, capsys)
    wrong = [f"{key}: {_get(parsed, key)!r}, published {value!r} ({source})" for key, value, source in table
             if _get(parsed, key) != value]
    assert not wrong, "\n".join(wrong)
    assert parsed["trainer"]["devices"] * parsed["data"]["batch_size"] == GLOBAL_BATCH[config]
    assert parsed["model"]["sampler"]["init_args"]["grid"] is None  # the policy's own grid (its scheduler's)


def test_klein_pickscore_overlay_trains_on_pickscore_alone(capsys):
    """config/flux2_klein.py reward="pickscore": the mix recipe with PickScore as the only reward."""
    parsed = _parsed("configs/flux2_klein_precise.yaml --config configs/flux2_klein_pickscore.yaml", capsys)
    assert list(parsed["reward"]["rewards"]) == ["pickscore"] and parsed["reward"]["normalize"] is True
    wrong = [key for key, value, _ in KLEIN if not key.startswith("reward.") and _get(parsed, key) != value]
    assert not wrong, wrong


def test_klein_geneval_overlay_trains_on_the_geneval_server(capsys):
    """config/flux2_klein.py reward="geneval": GenEval alone over HTTP, GenEval's prompts, its evaluation batch."""
    parsed = _parsed("configs/flux2_klein_precise.yaml --config configs/flux2_klein_geneval.yaml", capsys)
    reward = parsed["reward"]
    assert list(reward["rewards"]) == ["geneval"] and reward["normalize"] is True and reward["metrics"] == {}
    geneval = reward["rewards"]["geneval"]
    assert geneval["class_path"] == "precise_lightning.rewards.GenEvalReward"
    args = geneval["init_args"]
    assert (args["urls"], args["batch_size"], args["only_strict"], args["eval_only_strict"]) \
        == ("http://127.0.0.1:18085", 64, True, False)  # {PRECISE} rewards/remote.py, registry.py, rl_trainer.py eval
    assert parsed["data"]["train_file"].endswith("geneval/train_metadata.jsonl")
    assert parsed["data"]["eval_batch_size"] == 7  # {PRECISE} config/base.py geneval_eval_targets
    wrong = [key for key, value, _ in KLEIN if not key.startswith("reward.") and _get(parsed, key) != value]
    assert not wrong, wrong
