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
from torch.utils.hooks import RemovableHandle


class EMA(Callback):
    """shadow <- d shadow + (1 - d) w right after optimizer step k (k optimizer steps done) whenever
    ``(k + 1) % every_n_steps == 0``, with d = min((1 + k) / (10 + k), decay) when ``warmup`` (else ``decay``): the
    schedule of Flow-GRPO's and the Precise code's ``ema.py`` (``step(parameters, global_step)``).

    Those call the blend once per micro-batch, so a qualifying step's weights are blended once for each micro-batch
    until the next optimizer step: ``blends_per_step`` times (their micro-batches per optimizer step; Precise's
    Klein recipe 8, Flow-GRPO's SD3.5 recipe 2), i.e. one blend with d ** blends_per_step. The blend runs in the
    optimizer's step post-hook, so it sees the weights of that step, as theirs does, not those at the rollout's end.
    """

    def __init__(self, decay: float = 0.9, every_n_steps: int = 8, warmup: bool = True,
                 blends_per_step: int = 1) -> None:
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if blends_per_step < 1:
            raise ValueError(f"blends_per_step must be >= 1, got {blends_per_step}")
        self.decay, self.every_n_steps, self.warmup = decay, every_n_steps, warmup
        self.blends_per_step = blends_per_step
        self.shadow: dict[str, torch.Tensor] = {}
        self.num_updates = 0
        self._hooks: list[RemovableHandle] = []

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

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._hooks = [opt.register_step_post_hook(lambda *_: self.after_optimizer_step(trainer, pl_module))
                       for opt in trainer.optimizers]

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    @torch.no_grad()
    def after_optimizer_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Blend if the step just taken qualifies (Lightning counts it in ``global_step`` after this hook)."""
        k = trainer.global_step + 1
        if (k + 1) % self.every_n_steps:
            return
        d = self.current_decay(k) ** self.blends_per_step
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
