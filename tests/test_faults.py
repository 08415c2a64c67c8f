"""Faults and bad input: non-finite values skip the update and stop a run that keeps producing them, failing
rewards and out-of-memory errors explain themselves, incompatible checkpoints are refused; runs are deterministic."""

import math
import re
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import cli
from precise_lightning.callbacks import RewardScorer
from conftest import demo_args


class Scripted(nn.Module):
    """Wraps a reward: on the calls ``bad(call)`` selects (1-based) it returns NaN, a constant, or raises. A rollout
    scores its micro-batches one call each: 2 calls per rollout in these runs (32 images, micro-batches of 16)."""

    def __init__(self, inner: nn.Module, bad, mode: str) -> None:
        super().__init__()
        self.inner, self.bad, self.mode, self.calls = inner, bad, mode, 0

    def forward(self, images, prompts):
        self.calls += 1
        scores = self.inner(images, prompts)
        if not self.bad(self.calls):
            return scores
        if self.mode == "raise":
            raise ValueError("scorer crashed")
        return torch.full_like(scores, math.nan if self.mode == "nan" else 0.5)


def _run(tmp_path, *extra):
    run = cli.main(demo_args(tmp_path, "--trainer.val_check_interval", "1000", "--model.eval_at_start", "false",
                         "--trainer.max_steps", "20", *extra), run=False)  # reward calls: rollouts only
    run.trainer.callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True))
    return run


def _script_reward(run, bad, mode):
    scorer = next(cb for cb in run.trainer.callbacks if isinstance(cb, RewardScorer))
    scorer.rewards["digit"] = Scripted(scorer.rewards["digit"], bad, mode)
    return scorer.rewards["digit"]


def _scale_velocity(run, when):
    """Multiply the denoiser's output by NaN whenever ``when()`` holds."""
    net = run.model.policy.denoiser
    forward = net.forward
    net.forward = lambda *a, **k: forward(*a, **k) * (math.nan if when() else 1.0)


@pytest.mark.parametrize(
    "fault,first_bad,reason,steps",
    [
        (lambda run: _script_reward(run, lambda call: call >= 5, "nan"), 3, r"non-finite rewards in rollout 2", 4),
        (lambda run: _scale_velocity(run, lambda: True), 1,
         r"non-finite latents \(velocities\), log-probs, rewards in rollout 0", 0),
        # the optimizer steps run with their gradients dropped (weights and AdamW state untouched), and count, as
        # a step the 16-mixed GradScaler skips counts
        (lambda run: _scale_velocity(run, torch.is_grad_enabled), 1, r"non-finite gradient norm in rollout 0", 4),
    ],
    ids=["rewards", "velocities", "gradients"],
)
def test_non_finite_values_skip_updates_then_stop_keeping_the_last_good_checkpoint(tmp_path, fault, first_bad, reason,
                                                                                   steps):
    run = _run(tmp_path, "--model.max_bad_iterations", "2")
    fault(run)
    initial = {n: p.detach().clone() for n, p in run.model.policy.named_trainable_parameters()}
    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError) as error:
        warnings.simplefilter("always")
        run.trainer.fit(run.model, datamodule=run.datamodule)
    assert "2 iterations in a row had non-finite" in str(error.value) and "last checkpoint is good" in str(error.value)
    skips = [str(w.message) for w in caught if "update skipped" in str(w.message)]
    assert skips and re.search(reason, skips[0]), skips
    good_steps = 2 * (first_bad - 1)  # 2 optimizer steps per good iteration
    assert run.trainer.global_step == steps and run.model.guard.skipped >= 2
    weights = dict(run.model.policy.named_trainable_parameters())
    assert all(torch.isfinite(p).all() for p in weights.values())
    if not good_steps:  # nothing trained: weights as they started, no AdamW state
        assert all(torch.equal(initial[n], p) for n, p in weights.items())
        assert not run.trainer.optimizers[0].state
    if good_steps:  # the last checkpoint holds exactly the weights the run stopped with: nothing lost
        state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
        assert state["global_step"] == good_steps
        for name, p in weights.items():
            assert torch.equal(state["state_dict"][f"policy.{name}"], p.detach())


def test_isolated_non_finite_iteration_is_skipped_and_training_goes_on(tmp_path):
    run = _run(tmp_path, "--model.max_bad_iterations", "2", "--trainer.max_steps", "6")
    _script_reward(run, lambda call: call == 4, "nan")  # the second micro-batch of rollout 1
    with pytest.warns(RuntimeWarning, match="update skipped: non-finite rewards in rollout 1"):
        run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step == 6 and run.model.rollouts == 4  # one rollout's update skipped
    assert (run.model.guard.skipped, run.model.guard.in_a_row) == (1, 0)
    assert run.trainer.callback_metrics["train/skipped_updates"] == 1


def test_groups_with_equal_rewards_carry_no_signal_and_are_counted(tmp_path):
    run = _run(tmp_path, "--trainer.max_steps", "2", "--model.optimizer.init_args.weight_decay", "0")
    _script_reward(run, lambda call: True, "constant")
    before = {n: p.detach().clone() for n, p in run.model.policy.named_trainable_parameters()}
    run.trainer.fit(run.model, datamodule=run.datamodule)
    metrics = run.trainer.callback_metrics
    assert metrics["train/flat_groups"] == 4 and metrics["train/zero_advantage_fraction"] == 1  # 32 images / 8
    assert metrics["train/policy_loss"] == 0 and math.isfinite(metrics["train/grad_norm"])
    after = dict(run.model.policy.named_trainable_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # zero advantages: zero gradients, no change


def test_failing_reward_names_itself_and_the_prompts(tmp_path):
    run = _run(tmp_path)
    _script_reward(run, lambda call: True, "raise")
    with pytest.raises(RuntimeError, match=r"reward 'digit' \(Scripted\) failed on prompts 'a handwritten digit \d+'"
                                           r".* and 13 more: scorer crashed"):
        run.trainer.fit(run.model, datamodule=run.datamodule)


def test_out_of_memory_is_reraised_with_the_knobs_that_help(tmp_path):
    run = _run(tmp_path)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    run.model.policy.denoiser.forward = oom
    with pytest.raises(torch.OutOfMemoryError) as error:
        run.trainer.fit(run.model, datamodule=run.datamodule)
    message = str(error.value)
    assert "out of memory in the rollout phase" in message
    for knob in ("model.micro_batch_size (now 16 of data.batch_size 32", "gradient_checkpointing", "lora_rank",
                 "ShardedStrategy"):
        assert knob in message, knob
    assert "Tried to allocate 20.00 GiB" in str(error.value.__cause__)


@pytest.mark.parametrize(
    "change,message",
    [
        (["--model.policy.init_args.lora_rank", "8"], r"lora: checkpoint \(4, None, \[.*\]\), config \(8, None"),
        (["--model.policy.init_args.lora_rank", "0", "--model.policy.init_args.hidden", "48"],
         r"trainable tensors only in the checkpoint, e\.g\. denoiser\.base_model"),
    ],
    ids=["lora-rank", "model"],
)
def test_checkpoint_of_another_policy_configuration_is_refused(tmp_path, change, message):
    lora = ["--model.policy.init_args.lora_rank", "4", "--model.policy.init_args.lora_targets", "[inp, out]"]
    first = cli.main(demo_args(tmp_path / "a", "--trainer.max_steps", "2", *lora), run=False)
    first.trainer.fit(first.model, datamodule=first.datamodule)
    first.trainer.save_checkpoint(tmp_path / "a.ckpt")
    other = cli.main(demo_args(tmp_path / "b", "--trainer.max_steps", "4", *lora, *change), run=False)
    with pytest.raises(ValueError, match="made for another policy configuration") as error:
        other.trainer.fit(other.model, datamodule=other.datamodule, ckpt_path=tmp_path / "a.ckpt")
    assert re.search(message, str(error.value)), str(error.value)


def test_same_seed_and_config_give_the_same_rollouts_and_first_update(tmp_path):
    runs = []
    for name in ("a", "b"):
        run = cli.main(demo_args(tmp_path / name, "--trainer.max_steps", "1", "--trainer.val_check_interval", "1000"),
                       run=False)
        run.trainer.fit(run.model, datamodule=run.datamodule)
        runs.append(run)
    a, b = (dict(r.model.policy.named_trainable_parameters()) for r in runs)
    assert all(torch.equal(a[n], b[n]) for n in a)
    for key in ("train/reward", "train/reward_std", "train/grad_norm", "train/policy_loss"):
        assert runs[0].trainer.callback_metrics[key] == runs[1].trainer.callback_metrics[key], key
    other = cli.main(demo_args(tmp_path / "c", "--trainer.max_steps", "1", "--trainer.val_check_interval", "1000",
                           "--seed_everything", "1"), run=False)
    other.trainer.fit(other.model, datamodule=other.datamodule)
    assert other.trainer.callback_metrics["train/reward_std"] != runs[0].trainer.callback_metrics["train/reward_std"]
