"""Each recipe config against a table of the published run's values, each row citing its source. The config is
parsed as the command line parses it (every default filled in, nothing loaded): changing a value in a config, or a
default it relies on, without changing the table fails here. Differences from the published code are listed in the
README's recipe table, not here."""

import pytest
import yaml

import cli
from conftest import model_recipes

# The published trees read (a file:line is at these commits): Flow-GRPO ac4c86e, Precise, FlowCPS, DanceGRPO as
# fetched on 2026-12-02.
FLOW_GRPO = "yifan123/flow_grpo"
PRECISE = "Tencent-Hunyuan/Precise"
FLOW_CPS = "IamCreateAI/FlowCPS"
DANCE = "XueZeyue/DanceGRPO"
NFT = "NVlabs/DiffusionNFT@24af555"
SD35_LORA = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out"]
KLEIN_LORA = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.to_qkv_mlp_proj", "attn.add_k_proj",
              "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out",
              "ff_context.linear_in", "ff_context.linear_out"]

# (dotted key in the parsed config, published value, source file:line)
SD35 = [
    ("model.policy.init_args.model", "stabilityai/stable-diffusion-3.5-medium", f"{FLOW_GRPO} config/grpo.py:112"),
    ("model.policy.init_args.resolution", 512, f"{FLOW_GRPO} config/grpo.py:117"),
    ("model.policy.init_args.guidance_scale", 4.5, f"{FLOW_GRPO} config/grpo.py:115"),
    ("model.policy.init_args.detach_uncond", True, f"{FLOW_GRPO} scripts/train_sd3.py:189-190"),
    ("model.policy.init_args.negative_prompt", "", f"{FLOW_GRPO} scripts/train_sd3.py:540"),
    ("model.policy.init_args.max_sequence_length", 128, f"{FLOW_GRPO} scripts/train_sd3.py:540,625"),
    ("model.policy.init_args.text_dtype", "float16", f"{FLOW_GRPO} scripts/train_sd3.py:403-413 (inference_dtype)"),
    ("model.policy.init_args.vae_dtype", "float32", f"{FLOW_GRPO} scripts/train_sd3.py:410"),
    ("model.policy.init_args.lora_rank", 32, f"{FLOW_GRPO} scripts/train_sd3.py:430"),
    ("model.policy.init_args.lora_init", "gaussian", f"{FLOW_GRPO} scripts/train_sd3.py:432"),
    ("model.policy.init_args.lora_alpha", 64.0, f"{FLOW_GRPO} scripts/train_sd3.py:431"),
    ("model.policy.init_args.lora_targets", SD35_LORA, f"{FLOW_GRPO} scripts/train_sd3.py:419-428"),
    ("model.sampler.init_args.num_steps", 10, f"{FLOW_GRPO} config/grpo.py:113"),
    ("model.train_fraction", 1.0, f"{FLOW_GRPO} config/grpo.py:127, train_sd3.py:345 (int(10 x 0.99): all but last)"),
    ("model.eval_sampler.init_args.rule", "ode", f"{FLOW_GRPO} scripts/train_sd3.py:247-258 (noise_level=0)"),
    ("model.eval_sampler.init_args.num_steps", 40, f"{FLOW_GRPO} config/grpo.py:114"),
    ("model.optimizer.init_args.lr", 3e-4, f"{FLOW_GRPO} config/base.py:63"),
    ("model.optimizer.init_args.betas", [0.9, 0.999], f"{FLOW_GRPO} config/base.py:65-67"),
    ("model.optimizer.init_args.weight_decay", 1e-4, f"{FLOW_GRPO} config/base.py:69"),
    ("model.optimizer.init_args.eps", 1e-8, f"{FLOW_GRPO} config/base.py:71"),
    ("model.clip_range", 4e-6, f"{PRECISE} config/flux2_klein.py:92 (the sampler's PPO settings, README)"),
    ("model.ratio_norm", True, f"{PRECISE} config/flux2_klein.py:95 (the sampler's PPO settings, README)"),
    ("model.log_prob_form", "gaussian", f"{FLOW_GRPO} sd3_sde_with_logprob.py:61-68"),
    ("model.adv_clip_max", 5.0, f"{FLOW_GRPO} config/base.py:84"),
    ("model.beta", 0.01, f"{FLOW_GRPO} config/grpo.py:128"),
    ("model.kl_form", "flow_grpo", f"{FLOW_GRPO} scripts/train_sd3.py:895, sd3_sde_with_logprob.py:47-50"),
    ("model.kl_eta", 0.7, f"{FLOW_GRPO} config/base.py:54 (sample.noise_level)"),
    ("model.std_scope", "global", f"{FLOW_GRPO} config/grpo.py:129"),
    ("model.std_unbiased", False, f"{FLOW_GRPO} flow_grpo/stat_tracking.py:27 (np.std)"),
    ("model.std_eps", 1e-4, f"{FLOW_GRPO} flow_grpo/stat_tracking.py:27"),
    ("model.same_noise_per_group", False, f"{FLOW_GRPO} scripts/train_sd3.py:639-651 (no shared latents)"),
    ("model.updates_per_rollout", 2, f"{FLOW_GRPO} config/grpo.py:125"),
    ("model.drop_zero_advantage", True, f"{FLOW_GRPO} scripts/train_sd3.py:796-817"),
    ("model.inner_epochs", 1, f"{FLOW_GRPO} config/grpo.py:126"),
    ("model.max_grad_norm", 1.0, f"{FLOW_GRPO} config/base.py:76"),
    ("model.sampler.init_args.log_prob_reduce", "mean", f"{FLOW_GRPO} sd3_sde_with_logprob.py:68"),
    ("data.group_size", 24, f"{FLOW_GRPO} config/grpo.py:119"),
    ("ema.decay", 0.9, f"{FLOW_GRPO} scripts/train_sd3.py:445"),
    ("ema.every_n_steps", 8, f"{FLOW_GRPO} scripts/train_sd3.py:445"),
    ("ema.warmup", True, f"{FLOW_GRPO} flow_grpo/ema.py:33-37"),
    ("ema.blends_per_step", 2, f"{FLOW_GRPO} scripts/train_sd3.py:954-955 per micro-batch, config/grpo.py:118-125"),
    ("reward.rewards.pickscore.class_path", "precise_lightning.rewards.PickScore",
     f"{FLOW_GRPO} config/grpo.py:134-136"),
    ("reward.rewards.pickscore.init_args.dtype", "float32", f"{FLOW_GRPO} flow_grpo/rewards.py:50"),
    ("trainer.precision", "16-mixed", f"{FLOW_GRPO} config/base.py:21"),
    ("seed_everything", 42, f"{FLOW_GRPO} config/base.py:11"),
]

KLEIN = [
    ("model.policy.init_args.model", "black-forest-labs/FLUX.2-klein-base-4B", f"{PRECISE} config/flux2_klein.py:12"),
    ("model.policy.init_args.revision", "a3b4f4849157f664bdbc776fd7453c2783562f4d",
     f"{PRECISE} config/flux2_klein.py:13"),
    ("model.policy.init_args.resolution", 512, f"{PRECISE} config/flux2_klein.py:58"),
    ("model.policy.init_args.guidance_scale", 1.0, f"{PRECISE} config/flux2_klein.py:51"),
    ("model.policy.init_args.max_sequence_length", 128, f"{PRECISE} precise_sde/train/rl_trainer.py:592"),
    ("model.policy.init_args.vae_dtype", "float32", f"{PRECISE} precise_sde/train/adapters.py:112"),
    ("model.policy.init_args.lora_rank", 16, f"{PRECISE} precise_sde/train/adapters.py:133"),
    ("model.policy.init_args.lora_init", "gaussian", f"{PRECISE} precise_sde/train/adapters.py:135"),
    ("model.policy.init_args.lora_alpha", 16.0, f"{PRECISE} precise_sde/train/adapters.py:134"),
    ("model.policy.init_args.lora_targets", KLEIN_LORA, f"{PRECISE} precise_sde/train/adapters.py:117-131"),
    ("model.sampler.init_args.rule", "precise", f"{PRECISE} config/flux2_klein.py:53,169 (PRECISE_SDE_LAUNCH_SDE)"),
    ("model.sampler.init_args.eta", 1.5, f"{PRECISE} config/flux2_klein.py:114-116"),
    ("model.sampler.init_args.num_steps", 20, f"{PRECISE} config/flux2_klein.py:49,122"),
    ("model.sampler.init_args.stochastic_last_step", False,
     f"{PRECISE} sde_with_logprob.py:70-72 (precise: std 0 there)"),
    ("model.train_fraction", 1.0, f"{PRECISE} config/flux2_klein.py:74, rl_trainer.py:366 (all but the last)"),
    ("model.eval_sampler", "training", f"{PRECISE} config/flux2_klein.py:50,86-88 (the run's sde_type and N)"),
    ("trainer.val_check_interval", 50, f"{PRECISE} config/flux2_klein.py:83"),
    ("model.optimizer.init_args.lr", 8e-5, f"{PRECISE} config/flux2_klein.py:94"),
    ("model.optimizer.init_args.betas", [0.9, 0.999], f"{PRECISE} config/base.py:44-45"),
    ("model.optimizer.init_args.weight_decay", 1e-4, f"{PRECISE} config/base.py:46"),
    ("model.optimizer.init_args.eps", 1e-8, f"{PRECISE} config/base.py:47"),
    ("model.clip_range", 4e-6, f"{PRECISE} config/flux2_klein.py:92"),
    ("model.log_prob_form", "gaussian", f"{PRECISE} sde_with_logprob.py:179-185"),
    ("model.adv_clip_max", 5.0, f"{PRECISE} config/base.py:52"),
    ("model.beta", 0.0, f"{PRECISE} config/flux2_klein.py:75"),
    ("model.kl_form", "precise", f"{PRECISE} precise_sde/train/rl_trainer.py:903-906"),
    ("model.std_scope", "group", f"{PRECISE} config/flux2_klein.py:79"),
    ("model.std_unbiased", False, f"{PRECISE} precise_sde/core/stat_tracking.py:46 (np.std)"),
    ("model.std_eps", 1e-4, f"{PRECISE} precise_sde/core/stat_tracking.py:46"),
    ("model.same_noise_per_group", False, f"{PRECISE} config/flux2_klein.py:80 (same_latent False)"),
    ("model.ratio_norm", True, f"{PRECISE} config/flux2_klein.py:95"),
    ("model.updates_per_rollout", 2, f"{PRECISE} config/flux2_klein.py:72"),
    ("model.drop_zero_advantage", True, f"{PRECISE} precise_sde/train/rl_trainer.py:787-809"),
    ("model.inner_epochs", 1, f"{PRECISE} config/flux2_klein.py:73"),
    ("model.max_grad_norm", 1.0, f"{PRECISE} config/base.py:49"),
    ("data.group_size", 8, f"{PRECISE} config/flux2_klein.py:61"),
    ("ema.decay", 0.9, f"{PRECISE} precise_sde/train/rl_trainer.py:414"),
    ("ema.every_n_steps", 8, f"{PRECISE} precise_sde/train/rl_trainer.py:414"),
    ("ema.warmup", True, f"{PRECISE} precise_sde/core/ema.py:23-27"),
    ("ema.blends_per_step", 8, f"{PRECISE} rl_trainer.py:964-965 per micro-batch, config/flux2_klein.py:60-72"),
    ("reward.normalize", True, f"{PRECISE} config/base.py:62"),
    ("reward.weights", None, f"{PRECISE} config/base.py:69-70 (weights 1)"),
    ("reward.rewards.clipscore.class_path", "precise_lightning.rewards.PreciseCLIPScore",
     f"{PRECISE} config/base.py:70, precise_sde/rewards/scorers/clip.py:39-53"),
    ("reward.metrics.imagereward.class_path", "precise_lightning.rewards.ImageReward",
     f"{PRECISE} config/base.py:103-108"),
    ("trainer.precision", "bf16-mixed", f"{PRECISE} config/flux2_klein.py:91"),
    ("seed_everything", 42, f"{PRECISE} config/base.py:11"),
]

DANCE_LORA = f"{DANCE} scripts/finetune/finetune_flux_grpo_8gpus_lora.sh"
FLUX1 = [
    ("model.policy.init_args.model", "black-forest-labs/FLUX.1-dev", f"{DANCE_LORA}:21 (data/flux: FLUX.1-dev)"),
    ("model.policy.init_args.resolution", 720, f"{DANCE_LORA}:39-40"),
    ("model.policy.init_args.guidance", 3.5, f"{DANCE} fastvideo/train_grpo_flux_lora.py:177-178"),
    ("model.policy.init_args.guidance_scale", 1.0, f"{DANCE_LORA}:37 (--cfg 0.0)"),
    ("model.policy.init_args.gradient_checkpointing", True, f"{DANCE_LORA}:25"),
    ("model.policy.init_args.offload_text_encoders", True,
     f"{DANCE} fastvideo/train_grpo_flux_lora.py (prompts encoded ahead: no text encoder on the GPU)"),
    ("model.policy.init_args.lora_rank", 128, f"{DANCE_LORA}:58"),
    ("model.policy.init_args.lora_alpha", 256.0, f"{DANCE_LORA}:57"),
    ("model.policy.init_args.lora_targets", ["to_k", "to_q", "to_v", "to_out.0"],
     f"{DANCE} fastvideo/train_grpo_flux_lora.py:663"),
    ("model.policy.init_args.lora_init", "kaiming", f"{DANCE} fastvideo/train_grpo_flux_lora.py:662"),
    ("model.sampler.init_args.num_steps", 12, f"{DANCE_LORA}:42"),
    ("model.sampler.init_args.grid.class_path", "precise_lightning.sampling.LinearGrid",
     f"{DANCE} fastvideo/train_grpo_flux_lora.py:249-251 (sd3_time_shift on linspace)"),
    ("model.sampler.init_args.grid.init_args.shift", 3.0, f"{DANCE_LORA}:50"),
    ("model.optimizer.init_args.lr", 3e-4, f"{DANCE_LORA}:33"),
    ("model.optimizer.init_args.weight_decay", 1e-4, f"{DANCE_LORA}:47"),
    ("model.clip_range", 4e-6, f"{PRECISE} config/flux2_klein.py:92 (the sampler's PPO settings, README)"),
    ("model.ratio_norm", True, f"{PRECISE} config/flux2_klein.py:95 (the sampler's PPO settings, README)"),
    ("model.adv_clip_max", 5.0, f"{DANCE_LORA}:56"),
    ("model.beta", 0.0, f"{DANCE} fastvideo/train_grpo_flux_lora.py (no KL term)"),
    ("model.std_scope", "group", f"{DANCE_LORA}:51"),
    ("model.std_unbiased", True, f"{DANCE} fastvideo/train_grpo_flux_lora.py:486"),
    ("model.std_eps", 1e-8, f"{DANCE} fastvideo/train_grpo_flux_lora.py:486"),
    ("model.train_fraction", 0.6, f"{DANCE_LORA}:52-53"),
    ("model.same_noise_per_group", True, f"{DANCE_LORA}:54"),
    ("model.updates_per_rollout", 2, f"{DANCE_LORA}:26,31,49 (24 samples per GPU, a step every 12)"),
    ("model.max_grad_norm", 1.0, f"{DANCE_LORA}:46"),
    ("data.group_size", 12, f"{DANCE_LORA}:49"),
    ("reward.rewards.hpsv2.class_path", "precise_lightning.rewards.HPSv2", f"{DANCE_LORA}:48"),
    ("trainer.precision", "bf16-mixed", f"{DANCE_LORA}:34"),
    ("seed_everything", 42, f"{DANCE_LORA}:20"),
]

# Flow-GRPO's Qwen-Image run is newer than the tree above: its config is read at yifan123/flow_grpo 54809b5 and its
# trainer and pipeline at zhtmike/flow_grpo 27b6ef8 / 4b13ec7 (a fork carrying them) through a file index that gives
# no line numbers, so these rows name the function and the field.
QWEN_CONFIG = f"{FLOW_GRPO}@54809b5 config/grpo.py pickscore_qwenimage_8gpu()"
QWEN_TRAIN = "flow_grpo scripts/train_qwenimage.py"
QWEN_PIPE = "flow_grpo flow_grpo/diffusers_patch/qwenimage_pipeline_with_logprob.py pipeline_with_logprob()"
QWEN_LORA = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
             "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
             "txt_mlp.net.2"]
QWEN = [
    ("model.policy.init_args.model", "Qwen/Qwen-Image", f"{QWEN_CONFIG}: pretrained.model"),
    ("model.policy.init_args.resolution", 512, f"{QWEN_CONFIG}: resolution"),
    ("model.policy.init_args.guidance_scale", 4.0, f"{QWEN_CONFIG}: sample.guidance_scale (true_cfg_scale)"),
    ("model.policy.init_args.detach_uncond", False, f"{QWEN_TRAIN} compute_log_prob (one forward, no detach)"),
    ("model.policy.init_args.negative_prompt", " ", f"{QWEN_TRAIN} main(): negative_prompt=[' '] * len(prompts)"),
    ("model.policy.init_args.max_sequence_length", 512, f"{QWEN_PIPE}: max_sequence_length default"),
    ("model.policy.init_args.gradient_checkpointing", True, f"{QWEN_CONFIG}: activation_checkpointing"),
    ("model.policy.init_args.lora_rank", 64, f"{QWEN_TRAIN} main(): LoraConfig r"),
    ("model.policy.init_args.lora_init", "gaussian", f"{QWEN_TRAIN} main(): LoraConfig init_lora_weights"),
    ("model.policy.init_args.lora_alpha", 128.0, f"{QWEN_TRAIN} main(): LoraConfig lora_alpha"),
    ("model.policy.init_args.lora_targets", QWEN_LORA, f"{QWEN_TRAIN} main(): target_modules"),
    ("model.policy.init_args.vae_dtype", "float32", f"{QWEN_TRAIN} main(): pipeline.vae.to(dtype=torch.float32)"),
    ("model.sampler.init_args.num_steps", 10, f"{QWEN_CONFIG}: sample.num_steps"),
    ("model.sampler.init_args.sde_window", [3, 5],
     f"{QWEN_CONFIG}: sde_window_size 2, sde_window_range (0, 5); {QWEN_PIPE}: random.seed(process_index)"),
    ("model.eval_sampler.init_args.rule", "ode", f"{QWEN_TRAIN} eval(): noise_level=0"),
    ("model.eval_sampler.init_args.num_steps", 50, f"{QWEN_CONFIG}: sample.eval_num_steps"),
    ("model.optimizer.init_args.lr", 3e-4, f"{FLOW_GRPO} config/base.py:63"),
    ("model.optimizer.init_args.betas", [0.9, 0.999], f"{FLOW_GRPO} config/base.py:65-67"),
    ("model.optimizer.init_args.weight_decay", 1e-4, f"{FLOW_GRPO} config/base.py:69"),
    ("model.optimizer.init_args.eps", 1e-8, f"{FLOW_GRPO} config/base.py:71"),
    ("model.clip_range", 4e-6, f"{PRECISE} config/flux2_klein.py:92 (the sampler's PPO settings, README)"),
    ("model.ratio_norm", True, f"{PRECISE} config/flux2_klein.py:95 (the sampler's PPO settings, README)"),
    ("model.adv_clip_max", 5.0, f"{FLOW_GRPO} config/base.py:84"),
    ("model.beta", 0.0, f"{QWEN_CONFIG}: train.beta"),
    ("model.std_scope", "global", f"{QWEN_CONFIG}: sample.global_std"),
    ("model.std_unbiased", False, f"{FLOW_GRPO} flow_grpo/stat_tracking.py:27 (np.std)"),
    ("model.std_eps", 1e-4, f"{FLOW_GRPO} flow_grpo/stat_tracking.py:27"),
    ("model.same_noise_per_group", False, f"{QWEN_CONFIG}: sample.same_latent"),
    ("model.drop_zero_advantage", False, f"{QWEN_TRAIN} main() (every sample trains)"),
    ("model.micro_batch_size", 4, f"{QWEN_CONFIG}: train.batch_size"),
    ("model.updates_per_rollout", 2, f"{QWEN_CONFIG}: gradient_accumulation_steps = num_batches_per_epoch // 2"),
    ("model.max_grad_norm", 1.0, f"{FLOW_GRPO} config/base.py:76"),
    ("ema.decay", 0.0, f"{QWEN_CONFIG}: train.ema False (evaluation with the trained weights)"),
    ("data.group_size", 16, f"{QWEN_CONFIG}: sample.num_image_per_prompt"),
    ("data.eval_batch_size", 4, f"{QWEN_CONFIG}: sample.test_batch_size"),
    ("reward.rewards.pickscore.class_path", "precise_lightning.rewards.PickScore", f"{QWEN_CONFIG}: reward_fn"),
    ("trainer.precision", "bf16-mixed", f"{QWEN_CONFIG}: mixed_precision"),
    ("trainer.strategy.class_path", "precise_lightning.sharding.ShardedStrategy", f"{QWEN_TRAIN} main(): fsdp_wrapper"),
    ("model.shard_param_dtype", "bfloat16", f"{QWEN_TRAIN} main(): FSDPConfig mixed_precision_dtype"),
    ("seed_everything", 42, f"{FLOW_GRPO} config/base.py:11"),
]

# The sampler overlays on the Klein recipe: (key, value, source) each.
OVERLAYS = {
    "configs/samplers/flow_grpo.yaml": [
        ("model.sampler.init_args.rule", "flow_sde", f"{FLOW_GRPO} sd3_sde_with_logprob.py:47-59"),
        ("model.sampler.init_args.eta", 0.7, f"{FLOW_GRPO} config/base.py:54"),
        ("model.sampler.init_args.stochastic_last_step", True,
         f"{FLOW_GRPO} sd3_pipeline_with_logprob.py:137-161; {PRECISE} sde_with_logprob.py:61-67"),
        ("model.clip_range", 1e-4, f"{FLOW_GRPO} config/base.py:86"),
        ("model.ratio_norm", False, f"{FLOW_GRPO} scripts/train_sd3.py:886"),
    ],
    "configs/samplers/cps.yaml": [
        ("model.sampler.init_args.rule", "cps", f"{FLOW_CPS} flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:52-55"),
        ("model.sampler.init_args.eta", 0.7, f"{FLOW_CPS} config/base.py:56"),
        ("model.clip_range", 1e-4, f"{FLOW_CPS} config/base.py:94"),
        ("model.ratio_norm", False, f"{FLOW_CPS} scripts/train_sd3.py (ratio = exp(log_prob - old))"),
        ("model.log_prob_form", "cps", f"{FLOW_CPS} flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:66-70"),
        ("model.kl_form", "precise", f"{FLOW_CPS} scripts/train_sd3.py:900-901 (undivided)"),
    ],
    "configs/samplers/dance_grpo.yaml": [
        ("model.sampler.init_args.rule", "dance_sde", f"{DANCE} fastvideo/train_grpo_flux.py:131-156"),
        ("model.sampler.init_args.eta", 0.3, f"{DANCE} scripts/finetune/finetune_flux_grpo.sh:46"),
        ("model.sampler.init_args.stochastic_last_step", True, f"{PRECISE} sde_with_logprob.py:59-60 (dance_grpo)"),
        ("model.clip_range", 1e-4, f"{DANCE} scripts/finetune/finetune_flux_grpo.sh:58"),
        ("model.ratio_norm", False, f"{DANCE} fastvideo/train_grpo_flux.py (ratio = exp(new - old))"),
        ("model.train_fraction", 0.6, f"{DANCE} scripts/finetune/finetune_flux_grpo.sh:56, train_grpo_flux.py:570"),
        ("model.same_noise_per_group", True, f"{DANCE} scripts/finetune/finetune_flux_grpo.sh:57, "
                                             "train_grpo_flux.py:333-350"),
        ("model.std_unbiased", True, f"{DANCE} fastvideo/train_grpo_flux.py:542 (torch .std())"),
        ("model.std_eps", 1e-8, f"{DANCE} fastvideo/train_grpo_flux.py:542"),
    ],
}

# Global batch per iteration = processes x data.batch_size.
GLOBAL_BATCH = {"configs/sd35_precise.yaml": 48 * 24, "configs/flux2_klein_precise.yaml": 32 * 8,
                "configs/flux1_dev_hpsv2.yaml": 16 * 12,  # DanceGRPO: 8 GPUs x 2 prompts x 12
                "configs/qwen_image_pickscore.yaml": 32 * 16}  # Flow-GRPO: 8 GPUs x 16 batches x 4


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


RECIPES = [("configs/sd35_precise.yaml", SD35), ("configs/flux2_klein_precise.yaml", KLEIN),
           ("configs/flux1_dev_hpsv2.yaml", FLUX1), ("configs/qwen_image_pickscore.yaml", QWEN)]


def test_every_model_s_recipe_has_a_table():
    """A new model's recipe config comes with its table here (the one test entry a model adds)."""
    assert {m.config for m in model_recipes()} <= {config for config, _ in RECIPES}


@pytest.mark.parametrize("config,table", RECIPES, ids=["sd35", "flux2_klein", "flux1_dev", "qwen_image"])
def test_recipe_matches_the_published_run(config, table, capsys):
    parsed = _parsed(config, capsys)
    wrong = [f"{key}: {_get(parsed, key)!r}, published {value!r} ({source})" for key, value, source in table
             if _get(parsed, key) != value]
    assert not wrong, "\n".join(wrong)
    assert parsed["trainer"]["devices"] * parsed["data"]["batch_size"] == GLOBAL_BATCH[config]
    strategy = parsed["trainer"]["strategy"]
    if isinstance(strategy, dict):  # sharded over every process
        assert strategy["init_args"]["data_parallel_size"] == parsed["trainer"]["devices"]
    if table is not FLUX1:  # DanceGRPO samples FLUX.1 on its own shift-3 linspace (a row above)
        assert parsed["model"]["sampler"]["init_args"]["grid"] is None  # the policy's own grid (its scheduler's)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_sampler_overlays_carry_their_published_settings_and_evaluate_with_their_sde(overlay, capsys):
    """Each overlay on the Klein recipe: the published values of its code, and evaluation with its own sampler (the
    Klein recipe's ``eval_sampler: training``), as the Precise code evaluates each compared sampler."""
    parsed = _parsed(f"configs/flux2_klein_precise.yaml --config {overlay}", capsys)
    wrong = [f"{key}: {_get(parsed, key)!r}, published {value!r} ({source})" for key, value, source in OVERLAYS[overlay]
             if _get(parsed, key) != value]
    assert not wrong, "\n".join(wrong)
    assert parsed["model"]["eval_sampler"] == "training"


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


def test_qwen_image_window_is_the_one_flow_grpo_s_seeded_draw_gives():
    """Flow-GRPO's Qwen-Image rollout (qwenimage_pipeline_with_logprob.py) re-seeds Python's RNG with process_index
    (never passed by train_qwenimage.py, so 0) before drawing the window start in [0, 5 - 2]: the same window, steps
    3 and 4, on every process and every rollout."""
    import random

    random.seed(0)
    start = random.randint(0, 5 - 2)
    assert [start, start + 2] == next(v for k, v, _ in QWEN if k == "model.sampler.init_args.sde_window")


def test_sd35_ocr_overlay_is_flow_grpo_s_text_rendering_run(capsys):
    """config/grpo.py general_ocr_sd3 (lines 29-67) differs from pickscore_sd3 in its reward, prompts and beta."""
    parsed = _parsed("configs/sd35_precise.yaml --config configs/sd35_ocr.yaml", capsys)
    assert list(parsed["reward"]["rewards"]) == ["ocr"]  # {FLOW_GRPO} config/grpo.py:60-62
    assert parsed["reward"]["rewards"]["ocr"]["class_path"] == "precise_lightning.rewards.OCRReward"
    assert parsed["model"]["beta"] == 0.04  # {FLOW_GRPO} config/grpo.py:52
    assert parsed["data"]["eval_file"] == "data/ocr/test.txt"  # {FLOW_GRPO} config/grpo.py:32 (dataset/ocr)
    wrong = [key for key, value, _ in SD35 if key != "model.beta" and not key.startswith("reward.") and _get(parsed, key) != value]
    assert not wrong, wrong


NFT_CONFIG, NFT_BASE = f"{NFT} config/nft.py", f"{NFT} config/base.py"
NFT_TRAIN = f"{NFT} scripts/train_nft_sd3.py"
SD35_NFT = [  # on top of configs/sd35_precise.yaml
    ("model.objective.class_path", "precise_lightning.modules.nft.DiffusionNFT", f"{NFT_TRAIN}:909-970"),
    ("model.objective.init_args.beta", 1.0, f"{NFT_CONFIG}:61"),
    ("model.objective.init_args.kl_weight", 0.0001, f"{NFT_CONFIG}:24"),
    ("model.objective.init_args.decay_flat", 0, f"{NFT_CONFIG}:60, {NFT_TRAIN}:174-177 (decay_type 1)"),
    ("model.objective.init_args.decay_rate", 0.001, f"{NFT_TRAIN}:176"),
    ("model.objective.init_args.decay_ceiling", 0.5, f"{NFT_TRAIN}:177"),
    ("model.objective.init_args.timestep_fraction", 0.99, f"{NFT_BASE}:87"),
    ("model.policy.init_args.model", "stabilityai/stable-diffusion-3.5-medium", f"{NFT_CONFIG}:19"),
    ("model.policy.init_args.resolution", 512, f"{NFT_CONFIG}:23"),
    ("model.policy.init_args.guidance_scale", 1.0, f"{NFT_CONFIG}:64"),
    ("model.policy.init_args.lora_rank", 32, f"{NFT_TRAIN}:431"),
    ("model.policy.init_args.lora_alpha", 64.0, f"{NFT_TRAIN}:431"),
    ("model.policy.init_args.lora_init", "gaussian", f"{NFT_TRAIN}:431"),
    ("model.policy.init_args.lora_targets", SD35_LORA, f"{NFT_TRAIN}:421-430"),
    ("model.sampler.init_args.rule", "ode", f"{NFT_CONFIG}:65 (deterministic; its solver dpm2, line 66: README)"),
    ("model.sampler.init_args.num_steps", 10, f"{NFT_CONFIG}:20"),
    ("model.eval_sampler.init_args.rule", "ode", f"{NFT_TRAIN}:267-281 (deterministic flow solver)"),
    ("model.eval_sampler.init_args.num_steps", 40, f"{NFT_CONFIG}:21"),
    ("model.optimizer.init_args.lr", 3e-4, f"{NFT_BASE}:66"),
    ("model.optimizer.init_args.betas", [0.9, 0.999], f"{NFT_BASE}:68-70"),
    ("model.optimizer.init_args.weight_decay", 1e-4, f"{NFT_BASE}:72"),
    ("model.optimizer.init_args.eps", 1e-8, f"{NFT_BASE}:74"),
    ("model.adv_clip_max", 5.0, f"{NFT_BASE}:84"),
    ("model.std_scope", "global", f"{NFT_BASE}:57"),
    ("model.drop_zero_advantage", False, f"{NFT_TRAIN}:793 (filtered_samples = collated_samples)"),
    ("model.micro_batch_size", 9, f"{NFT_CONFIG}:26,42"),
    ("model.updates_per_rollout", 1, f"{NFT_CONFIG}:104 (gradient_step_per_epoch=1)"),
    ("model.max_grad_norm", 1.0, f"{NFT_BASE}:79"),
    ("model.beta", 0.0, "GRPO's KL weight, off: NFT's is kl_weight"),
    ("ema.decay", 0.9, f"{NFT_TRAIN}:567"),
    ("ema.every_n_steps", 1, f"{NFT_TRAIN}:567"),
    ("data.group_size", 24, f"{NFT_CONFIG}:28"),
    ("trainer.precision", "16-mixed", f"{NFT_BASE}:23"),
    ("trainer.val_check_interval", 10, f"{NFT_BASE}:21"),
]


def test_sd35_nft_overlay_is_diffusionnft_s_pickscore_run(capsys):
    parsed = _parsed("configs/sd35_precise.yaml --config configs/sd35_nft.yaml", capsys)
    wrong = [f"{key}: {_get(parsed, key)!r}, published {value!r} ({source})" for key, value, source in SD35_NFT
             if _get(parsed, key) != value]
    assert not wrong, "\n".join(wrong)
    assert parsed["trainer"]["devices"] * parsed["data"]["batch_size"] == 48 * 24  # config/nft.py:29, 8 GPUs
