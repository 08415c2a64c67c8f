"""Several CPU processes (gloo): 1 process, 2-process DDP and 2-process FSDP2 give the same update on the same
global batch; a run stopped and resumed from its checkpoint ends exactly where an uninterrupted one does."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import model_recipes, scalars
from precise_lightning.policies import SD3Policy

pytestmark = pytest.mark.slow  # multi-process fits: minutes, left out of the inner loop

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 32  # images per iteration over all processes: 4 prompts x 8
STRATEGIES = {
    "single": ["--trainer.devices", "1", "--trainer.strategy", "auto"],
    "ddp": ["--trainer.devices", "2", "--trainer.strategy", "ddp"],
    "fsdp": ["--trainer.devices", "2", "--trainer.strategy", "precise_lightning.sharding.ShardedStrategy",
             "--trainer.strategy.init_args.data_parallel_size", "2",
             "--trainer.strategy.init_args.tensor_parallel_size", "1",
             "--model.shard_param_dtype", "float32"],  # float32 compute, to compare with the unsharded runs
}


NFT = ["--model.objective", "precise_lightning.modules.nft.DiffusionNFT", "--model.sampler.init_args.rule", "ode"]


def _fit(tmp_path: Path, name: str, strategy: str, *extra: str, ckpt: Path | None = None) -> dict:
    """The shrunk demo under ``strategy``; returns the weights, EMA, final metrics and the logged train rewards."""
    procs = 2 if strategy != "single" else 1
    args = [
        "--config", "configs/digits_precise.yaml", "--model.policy.init_args.hidden", "32",
        "--model.policy.init_args.pretrain_steps", "20", "--trainer.val_check_interval", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / name),
        "--data.batch_size", str(GLOBAL_BATCH // procs), "--data.eval_batch_size", "16", "--data.eval_repeats", "2",
        "--model.micro_batch_size", "8", "--ema.every_n_steps", "1", *STRATEGIES[strategy], *extra,
    ]
    return _launch(tmp_path, name, args, ckpt)


def _launch(tmp_path: Path, name: str, args: list[str], ckpt: Path | None = None) -> dict:
    out = tmp_path / f"{name}.pt"
    env = {**os.environ, "PRECISE_LIGHTNING_CACHE": str(tmp_path.parent / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "tests/distributed_run.py", str(out), str(ckpt or "-"), *args], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    state = torch.load(out)
    (version,) = (tmp_path / name).glob("*/version_*")
    state["version"] = version
    state["rewards"] = scalars(version)["train/reward"]
    state["checkpoint"] = version / "checkpoints" / "last.ckpt"
    return state


def _assert_same(a: dict, b: dict, atol: float) -> None:
    for name, value in a["params"].items():
        torch.testing.assert_close(b["params"][name], value, rtol=0, atol=atol, msg=name)
        torch.testing.assert_close(b["ema"]["shadow"][name], a["ema"]["shadow"][name], rtol=0, atol=atol, msg=name)
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"]
    assert a["old"].keys() == b["old"].keys()  # DiffusionNFT's old (sampling) policy, when it runs
    for name, value in a["old"].items():
        torch.testing.assert_close(b["old"][name], value, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize(
    "setting",
    [
        # full fine-tuning, rewards gathered for the std, 2 optimizer steps; flat groups dropped: the first rollout's
        # micro-batches (one group each) are digits 4, 6, 1, 5, so under 2 processes rank 0 keeps none of its two
        # and runs stand-ins while rank 1 keeps both
        ["--model.std_scope", "global", "--model.drop_zero_advantage", "true",
         "--reward.rewards.digit.class_path", "flat_reward.FlatDigitsReward"],
        ["--model.policy.init_args.lora_rank", "4", "--model.policy.init_args.lora_targets", "[inp, mid1, mid2, out]",
         "--model.beta", "0.05", "--model.ratio_norm", "true",  # LoRA on a frozen sharded base, KL, GRPO-Guard,
         "--model.sampler.init_args.rule", "precise_2m"],  # and the multistep rule's stored previous x0_hat
        NFT,  # DiffusionNFT's update on ODE rollouts, its old policy and its reference KL
    ],
    ids=["full-global-std", "lora-kl-2m", "nft"],
)
def test_one_process_ddp_and_fsdp_give_the_same_update(tmp_path, setting):
    """Same global batch, same per-sample noise: the update does not depend on how the batch is split (float32;
    the tolerance covers summation order in the all-reduce, measured differences are below 1e-7)."""
    # DDP only with the first setting: its all-reduce of gradients does not depend on the objective or the adapter
    strategies = list(STRATEGIES) if "--model.drop_zero_advantage" in setting else ["single", "fsdp"]
    runs = {s: _fit(tmp_path, s, s, "--trainer.max_steps", "2", *setting) for s in strategies}
    for strategy in strategies[1:]:
        _assert_same(runs["single"], runs[strategy], atol=1e-6)
        # identical rollouts; the logged value is a mean of per-rank means under DDP / FSDP2, so it may differ from
        # the one-process mean in the last bit (measured: 1 float32 ulp with Precise-2M)
        assert runs[strategy]["rewards"] == pytest.approx(runs["single"]["rewards"], rel=1e-6, abs=0)
        for key, value in runs["single"]["metrics"].items():  # whole-batch, whole-model values, not a rank's or shard's
            if key.startswith("train/"):
                assert runs[strategy]["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    if setting is not NFT:  # PPO's ratio (NFT has none)
        assert runs["single"]["metrics"]["train/ratio_drift_first"] == 0.0
    if "--model.drop_zero_advantage" in setting:
        assert runs["single"]["metrics"]["train/dropped_micro_batches"] == 1.0  # of 2 per optimizer step


@pytest.mark.parametrize("strategy,objective,iterations", [("ddp", [], 6), ("fsdp", [], 6), ("fsdp", NFT, 3)],
                         ids=["ddp", "fsdp", "fsdp-nft"])  # 1 process: test_preemption.py (within an epoch)
def test_stopped_and_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, strategy, objective, iterations):
    """6 iterations (an epoch is 5: the prompt order crosses an epoch after the restart) against 2 + 4 resumed
    from the checkpoint written at iteration 2: bit-identical weights, EMA and logged rewards (FSDP2: from a
    sharded checkpoint). DiffusionNFT's old policy travels in the checkpoint too (3 iterations: 2 + 1)."""
    steps = ["--data.batch_size", str(2 * GLOBAL_BATCH // (2 if strategy != "single" else 1)), *objective]
    total = str(2 * iterations)
    full = _fit(tmp_path, "full", strategy, "--trainer.max_steps", total, *steps)
    first = _fit(tmp_path, "first", strategy, "--trainer.max_steps", "4", *steps)
    resumed = _fit(tmp_path, "resumed", strategy, "--trainer.max_steps", total, *steps, ckpt=first["checkpoint"])
    assert first["checkpoint"].is_dir() == (strategy == "fsdp")  # FSDP2: a sharded (distributed) checkpoint
    assert (resumed["step"], resumed["rollouts"]) == (full["step"], full["rollouts"]) == (2 * iterations, iterations)
    _assert_same(full, resumed, atol=0)
    assert first["rewards"] + resumed["rewards"] == full["rewards"]
    assert full["metrics"]["eval/reward"] == resumed["metrics"]["eval/reward"]


SHARDED = [(m.config, m.policy, True) for m in model_recipes()] + [
    ("configs/sd35_precise.yaml", SD3Policy, False)]  # and one full fine-tuning


@pytest.mark.parametrize("config,policy,lora", SHARDED, ids=[f"{Path(c).stem}-{'lora' if lora else 'full'}"
                                                             for c, _, lora in SHARDED])
def test_recipe_trains_sharded_and_exports_the_whole_model(tmp_path, model_root, config, policy, lora):
    """A tiny recipe with the FSDP2 overlay, 2 processes (float32 compute on CPU): what DiffusersExport writes is
    the gathered, whole trained weights, in files the stock classes load."""
    args = ["--config", config, "--config", "configs/tiny_cpu.yaml", "--model_root",
            str(model_root), "--trainer.logger.init_args.save_dir", str(tmp_path / "sd35"),
            "--trainer.enable_progress_bar", "false", "--config", "configs/fsdp.yaml", "--trainer.devices", "2",
            "--trainer.strategy.init_args.data_parallel_size", "2", "--model.shard_param_dtype", "float32",
            "--data.batch_size", "4",
            "--model.micro_batch_size", "2", "--trainer.max_steps", "2", "--model.optimizer.init_args.lr", "0.01"]
    if not lora:
        args += ["--model.policy.init_args.lora_rank", "0"]
    run = _launch(tmp_path, "sd35", args)
    assert run["metrics"]["train/ratio_drift_first"] == 0.0
    trained = {n.removeprefix("denoiser.").removeprefix("base_model.model.").replace(".default.", "."): p
               for n, p in run["params"].items()}
    if lora:
        exported = load_file(run["version"] / "lora" / "pytorch_lora_weights.safetensors")
        exported = {k.removeprefix("transformer."): v for k, v in exported.items()}
        policy.pipeline_class.from_pretrained(model_root / policy.hub_id).load_lora_weights(run["version"] / "lora")
    else:
        transformer_class = type(policy.pipeline_class.from_pretrained(model_root / policy.hub_id).transformer)
        exported = transformer_class.from_pretrained(run["version"] / "transformer").state_dict()
    assert set(trained) <= set(exported) and (not lora or set(exported) == set(trained))  # full: + buffers
    for name, value in trained.items():
        assert torch.equal(exported[name], value), name
