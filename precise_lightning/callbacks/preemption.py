"""Preemption and Ctrl-C: on SIGTERM (what SLURM and Kubernetes send before a kill), SIGUSR1 or SIGINT, finish the
current iteration, save a resumable checkpoint, say so, and exit non-zero on every process."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: what a shell reports for a process killed by it; schedulers retry on it
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: what a shell reports for a command stopped with Ctrl-C


class Preemption(Callback):
    """Stops a run at the end of the iteration in which SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) arrived, after writing
    ``<checkpoint dir>/last.ckpt`` (the ``ModelCheckpoint``'s directory, else ``<log dir>/checkpoints``), and exits
    on every process with status 143 (``SIGTERMException(143)``), or 130 after Ctrl-C. A second Ctrl-C stops at
    once, without a checkpoint (Lightning's ``KeyboardInterrupt`` handling).

    Lightning catches SIGTERM itself but only stops a single process at the end of an epoch (a pass over the prompt
    file: hundreds of iterations), writes nothing, and exits 0; on Ctrl-C it stops at once, writes nothing and
    exits 1. Under SLURM with ``auto_requeue`` Lightning's own SIGUSR1 handler (checkpoint and requeue) is left in
    place.
    """

    def __init__(self) -> None:
        super().__init__()
        self._signal: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here, not in setup: Lightning saves the handlers it finds after setup and puts them back after an error.
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_signal)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where a caller handles Ctrl-C itself
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)  # Lightning calls no end hooks after an error

    def _on_signal(self, signum: int, _: Any) -> None:
        if signum == signal.SIGINT:
            if self._signal == signal.SIGINT:
                signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT))
                raise KeyboardInterrupt
            rank_zero_info("\nCtrl-C: the run stops at the end of this iteration and saves a checkpoint; Ctrl-C "
                           "again stops at once without one")
        self._signal = signum

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        local = trainer.received_sigterm or self._signal is not None
        if not trainer.strategy.reduce_boolean_decision(local, all=False):  # any process's signal stops them all
            return
        interrupted = trainer.strategy.reduce_boolean_decision(self._signal == signal.SIGINT, all=False)
        name = "SIGINT" if interrupted else signal.Signals(self._signal or signal.SIGTERM).name
        code = INTERRUPTED_EXIT_CODE if interrupted else PREEMPTED_EXIT_CODE
        path = checkpoint_dir(trainer) / "last.ckpt"
        trainer.save_checkpoint(path)  # every process takes part (a collective under FSDP2)
        rank_zero_info(f"{name} received: saved a resumable checkpoint after rollout {pl_module.rollouts} "
                       f"(optimizer step {trainer.global_step}) to {path}; stopping with exit status {code}. "
                       f"Resume with --ckpt_path {path}")
        raise SIGTERMException(code)


def checkpoint_dir(trainer: Trainer) -> Path:
    """Where the run's checkpoints go: the ModelCheckpoint's directory, else ``<log dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
