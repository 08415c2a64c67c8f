"""A progress bar for long RL runs: rollouts done out of the run's total, not batches of an epoch."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar


class RolloutProgressBar(TQDMProgressBar):
    """``rollouts 120/3000 [...] train/reward=.., eval/reward=.., perf/s_per_rollout=..``, one bar for the whole run.

    The total is ``trainer.max_steps`` divided by the optimizer steps each rollout takes (``updates_per_rollout x
    inner_epochs``); epochs, which are passes over the prompt file, do not reset it.
    """

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        hp = pl_module.hparams
        per_rollout = hp.get("updates_per_rollout", 1) * hp.get("inner_epochs", 1)
        bar = self.train_progress_bar
        bar.reset(total=math.ceil(trainer.max_steps / per_rollout) if trainer.max_steps > 0 else None)
        bar.set_description("rollouts")
        _show(bar, getattr(pl_module, "rollouts", 0))  # a resumed run starts where it stopped

    def on_train_epoch_start(self, trainer: Trainer, *_: Any) -> None:
        pass  # one bar for the run

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *_: Any) -> None:
        n = getattr(pl_module, "rollouts", trainer.fit_loop.total_batch_idx + 1)
        if self._should_update(n, self.train_progress_bar.total):
            _show(self.train_progress_bar, n)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


def _show(bar: Any, n: int) -> None:
    """Set the bar's count to ``n`` (tqdm's own attribute and refresh)."""
    if not bar.disable:
        bar.n = n
        bar.refresh()
