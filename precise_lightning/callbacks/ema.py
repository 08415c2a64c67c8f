"""EMA of the trainable weights, swapped in for evaluation and saved in checkpoints.

Lightning's WeightAveraging copies the whole LightningModule; with LoRA on a multi-billion-parameter model that
is a second full model, so this keeps shadows of the trainable tensors only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor


class EMA(Callback):
    """shadow <- d shadow + (1 - d) w after optimizer step k (k optimizer steps done) whenever
    ``(k + 1) % every_n_steps == 0``, with d = min((1 + k) / (10 + k), decay) when ``warmup`` (else ``decay``): the
    schedule of Flow-GRPO's and the Precise code's ``ema.py`` (``step(parameters, global_step)``). Those call it once
    per micro-batch and trained step, so they blend the same weights several times while k stays a qualifying step;
    this blends once per qualifying step (a repeated blend of unchanged weights only raises the effective weight of
    the newest copy)."""

    def __init__(self, decay: float = 0.9, every_n_steps: int = 8, warmup: bool = True) -> None:
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.decay, self.every_n_steps, self.warmup = decay, every_n_steps, warmup
        self.shadow: dict[str, torch.Tensor] = {}
        self.num_updates = 0
        self._last_step = 0

    def _params(self, pl_module: LightningModule) -> dict[str, torch.nn.Parameter]:
        """The trainable weights, with each shadow laid out like its weight (device, and shards under FSDP2)."""
        for module in pl_module.policy.modules():
            if isinstance(module, FSDPModule):
                module.reshard()  # FSDP2 leaves the root's weights gathered after a forward without backward
        params = dict(pl_module.policy.named_trainable_parameters())
        for name, p in params.items():
            s = self.shadow.get(name)
            if isinstance(p, DTensor) and not isinstance(s, DTensor):  # a full tensor restored from a checkpoint
                self.shadow[name] = distribute_tensor(s.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            elif s is not None and s.device != p.device:
                self.shadow[name] = s.to(p.device)
        return params

    def current_decay(self, k: int) -> float:
        """The decay of a blend after optimizer step ``k``."""
        return min((1 + k) / (10 + k), self.decay) if self.warmup else self.decay

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.shadow:  # else restored from a checkpoint (sharded strategies restore after this hook)
            self.shadow = {n: p.detach().clone() for n, p in pl_module.policy.named_trainable_parameters()}

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self._last_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # A rollout takes several optimizer steps: blend if one of them qualifies, with that step's decay, the weights
        # being those after the rollout's last step (the published code blends those after the qualifying step).
        due = [k for k in range(self._last_step + 1, trainer.global_step + 1) if (k + 1) % self.every_n_steps == 0]
        if not due:
            return
        d = self.current_decay(due[-1])
        for name, p in self._params(pl_module).items():
            self.shadow[name].lerp_(p.detach(), 1 - d)
        self.num_updates += 1
        pl_module.log("ema/decay", d)

    @contextmanager
    def averaged(self, pl_module: LightningModule) -> Iterator[None]:
        """Within this context the trainable weights are the EMA's (no-op before the first fit start)."""
        if self.shadow:
            self._swap(pl_module)
        try:
            yield
        finally:
            if self.shadow:
                self._swap(pl_module)

    @torch.no_grad()
    def _swap(self, pl_module: LightningModule) -> None:
        for name, p in self._params(pl_module).items():
            tmp = p.detach().clone()
            p.copy_(self.shadow[name])
            self.shadow[name] = tmp

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.shadow and not trainer.sanity_checking:
            self._swap(pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.shadow and not trainer.sanity_checking:
            self._swap(pl_module)

    def state_dict(self) -> dict[str, Any]:
        """Whole-model shadows (sharded ones are gathered: every rank calls this when a checkpoint is saved)."""
        full = {n: s.full_tensor() if isinstance(s, DTensor) else s for n, s in self.shadow.items()}
        return {"shadow": {n: s.cpu() for n, s in full.items()}, "num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = dict(state_dict["shadow"])
        self.num_updates = state_dict["num_updates"]
