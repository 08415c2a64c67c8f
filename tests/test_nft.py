"""DiffusionNFT as the objective of a run (model.objective): the demo trains through it, rollouts come from the old
policy, which follows the trained one as the official code's schedule says. The loss itself:
tests/test_nft_losses.py; exact resume and 1 process = DDP = FSDP2: tests/test_distributed.py."""

import math

import pytest
import torch

import cli
from conftest import demo_args, run_dir, scalars
from precise_lightning.modules.nft import DiffusionNFT


def nft_args(log_dir, *extra):
    args = demo_args(log_dir, *extra)
    args[args.index("configs/digits_precise.yaml")] = "configs/digits_nft.yaml"
    return args


def test_demo_trains_through_nft_and_logs_its_terms(tmp_path):
    run = cli.main(nft_args(tmp_path), run=False)
    assert isinstance(run.model.objective, DiffusionNFT) and run.model.sampler.rule == "ode"
    before = {n: p.detach().clone() for n, p in run.model.policy.named_trainable_parameters()}
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step == 8
    params = dict(run.model.policy.named_trainable_parameters())
    assert any(not torch.equal(before[n], p) for n, p in params.items())
    logged = scalars(run_dir(tmp_path))
    for tag in ["train/reward", "train/policy_loss", "train/kl", "train/old_deviation", "train/grad_norm",
                "nft/old_decay", "eval/reward"]:
        assert tag in logged and all(math.isfinite(v) for v in logged[tag]), tag
    assert logged["nft/old_decay"] == pytest.approx([0.002, 0.004, 0.006, 0.008])  # decay_type 1: 2, 4, 6, 8 steps
    assert "train/ratio_mean" not in logged  # no PPO ratio
    old = run.model.objective.old
    assert set(old) == set(params) and any(not torch.equal(old[n], p) for n, p in params.items())


def test_old_policy_samples_and_follows_the_trained_one(tmp_path):
    """Rollouts run with the old weights, the trained ones come back after; follow() blends d old + (1 - d) new."""
    run = cli.main(nft_args(tmp_path, "--model.policy.init_args.pretrain_steps", "0"), run=False)
    module, nft = run.model, run.model.objective
    params = dict(module.policy.named_trainable_parameters())
    trained = {n: p.detach().clone() for n, p in params.items()}
    nft._pairs(module)  # the old policy starts as the trained one
    nft.old = {n: p + 1.0 for n, p in nft.old.items()}
    with nft.old_weights(module):
        assert all(torch.equal(params[n], trained[n] + 1.0) for n in params)
    assert all(torch.equal(params[n], trained[n]) for n in params)
    d = nft.follow(module, 100)
    assert d == pytest.approx(0.1)  # decay_type 1 at step 100
    for n in params:
        torch.testing.assert_close(nft.old[n], 0.1 * (trained[n] + 1.0) + 0.9 * trained[n])


def test_grpo_s_kl_weight_is_refused_with_nft(tmp_path):
    with pytest.raises(ValueError, match="model.beta .* weighs GRPO's KL"):
        cli.main(nft_args(tmp_path, "--model.beta", "0.1", "--model.policy.init_args.pretrain_steps", "0"),
                 run=False)


@pytest.mark.slow
def test_sd35_nft_recipe_trains_on_the_tiny_model(tmp_path, model_root):
    """DiffusionNFT's SD3.5 recipe through the real recipe and the CPU overlay: LoRA adapters move, the old policy
    follows them, NFT's terms are logged."""
    run = cli.main(["--config", "configs/sd35_precise.yaml", "--config", "configs/sd35_nft.yaml", "--config",
                    "configs/tiny_cpu.yaml", "--model_root", str(model_root), "--trainer.max_steps", "2",
                    "--model.optimizer.init_args.lr", "0.01", "--trainer.logger.init_args.save_dir", str(tmp_path),
                    "--trainer.enable_progress_bar", "false"], run=False)
    assert isinstance(run.model.objective, DiffusionNFT) and run.model.policy.guidance_scale == 1.0
    before = {n: p.detach().clone() for n, p in run.model.policy.named_trainable_parameters()}
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step == 2  # one optimizer step per iteration
    params = dict(run.model.policy.named_trainable_parameters())
    assert any(not torch.equal(before[n], p) for n, p in params.items() if "lora_B" in n)
    logged = scalars(run_dir(tmp_path))
    for tag in ["train/reward_pickscore", "train/policy_loss", "train/kl", "nft/old_decay", "eval/reward"]:
        assert tag in logged and all(math.isfinite(v) for v in logged[tag]), tag
