"""Faults a long run must survive or explain: non-finite values (skip the update, stop after too many in a row),
running out of memory (say which knobs lower it), and a distributed run that would abort at exit."""

from __future__ import annotations

import atexit
import functools
import warnings

import torch
from torch import Tensor

from precise_lightning.sampling import Trajectory


class NonFiniteGuard:
    """Counts updates skipped for non-finite values; raises once ``max_in_a_row`` iterations in a row skipped one.

    The weights never see a skipped update, so every checkpoint written before the error is a good state.
    """

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.skipped = 0  # in total
        self.in_a_row = 0  # consecutive iterations with a skip
        self._this_iteration = False

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self._this_iteration = True
        warnings.warn(f"update skipped: {reason} ({self.skipped} skipped so far)", RuntimeWarning, stacklevel=3)

    def end_iteration(self) -> None:
        self.in_a_row = self.in_a_row + 1 if self._this_iteration else 0
        self._this_iteration = False
        if self.in_a_row >= self.max_in_a_row:
            raise RuntimeError(
                f"{self.in_a_row} iterations in a row had non-finite velocities, log-probs, rewards or gradients "
                f"(model.max_bad_iterations = {self.max_in_a_row}); training stopped. The weights were never updated "
                "from them, so the last checkpoint is good. Lower the learning rate, check the reward models on these "
                "prompts, or run with trainer.precision 32-true to find the source."
            )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.in_a_row = state["skipped"], state["in_a_row"]


def non_finite_parts(trajectories: list[Trajectory], rewards: Tensor) -> list[str]:
    """Which parts of a rollout hold NaN or Inf (a non-finite velocity shows in the latents)."""
    checks = {
        "latents (velocities)": all(bool(torch.isfinite(t.latents[-1]).all()) for t in trajectories),
        "log-probs": all(bool(torch.isfinite(t.log_probs).all()) for t in trajectories),
        "rewards": bool(torch.isfinite(rewards).all()),
    }
    return [name for name, ok in checks.items() if not ok]


def oom_advice(phase: str, batch_size: int, micro_batch_size: int, lora_rank: int, sharded: bool) -> str:
    """The out-of-memory message: the knobs that lower memory for this configuration."""
    knobs = [
        f"lower model.micro_batch_size (now {micro_batch_size} of data.batch_size {batch_size}; rollout and update "
        "both run one micro-batch at a time)",
        "turn on model.policy.init_args.gradient_checkpointing (recomputes activations in the backward pass)",
        "lower model.policy.init_args.lora_rank" if lora_rank
        else "train LoRA adapters (model.policy.init_args.lora_rank > 0) instead of the whole denoiser",
    ]
    if not sharded:
        knobs.append("shard the denoiser: trainer.strategy: precise_lightning.sharding.ShardedStrategy "
                     "(FSDP2, see the README's section on scale)")
    return f"out of memory in the {phase} phase. To use less memory:\n  - " + "\n  - ".join(knobs)


@functools.cache  # once per process
def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, whatever the backend.

    Lightning registers this for NCCL only. A gloo group (CPU runs, and ``cpu:gloo`` collectives beside NCCL) left
    to interpreter finalization can hold pending work whose tensors are freed after Python is gone, and the
    process then dies with ``terminate called without an active exception`` (exit -6) after a finished run
    (pytorch/pytorch#190489).
    """
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
