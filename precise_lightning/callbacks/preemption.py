"""Preemption: on SIGTERM (what SLURM and Kubernetes send before a kill) or SIGUSR1, finish the current iteration,
save a resumable checkpoint, say so, and exit non-zero on every process."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: what a shell reports for a process killed by it; schedulers retry on it


class Preemption(Callback):
    """Stops a run at the end of the iteration in which SIGTERM or SIGUSR1 arrived, after writing
    ``<checkpoint dir>/last.ckpt`` (the ``ModelCheckpoint``'s directory, else ``<log dir>/checkpoints``), and exits
    with status 143 (``SIGTERMException(143)``) on every process.

    Lightning catches SIGTERM itself but only stops a single process at the end of an epoch (a pass over the prompt
    file: hundreds of iterations), writes nothing, and exits 0. Under SLURM with ``auto_requeue`` Lightning's own
    SIGUSR1 handler (checkpoint and requeue) is left in place.
    """

    def __init__(self) -> None:
        super().__init__()
        self._signal: int | None = None
        self._previous: Any = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            self._previous = signal.signal(signal.SIGUSR1, self._on_signal)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, _: Any) -> None:
        self._signal = signum

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        local = trainer.received_sigterm or self._signal is not None
        if not trainer.strategy.reduce_boolean_decision(local, all=False):  # any process's signal stops them all
            return
        name = signal.Signals(self._signal).name if self._signal is not None else "SIGTERM"
        path = checkpoint_dir(trainer) / "last.ckpt"
        trainer.save_checkpoint(path)  # every process takes part (a collective under FSDP2)
        rank_zero_info(f"{name} received: saved a resumable checkpoint after rollout {pl_module.rollouts} "
                       f"(optimizer step {trainer.global_step}) to {path}; stopping with exit status "
                       f"{PREEMPTED_EXIT_CODE}. Resume with --ckpt_path {path}")
        raise SIGTERMException(PREEMPTED_EXIT_CODE)


def checkpoint_dir(trainer: Trainer) -> Path:
    """Where the run's checkpoints go: the ModelCheckpoint's directory, else ``<log dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
