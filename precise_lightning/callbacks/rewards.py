"""Reward scoring. The reward models live here, not in the LightningModule: out of the optimizer, out of FSDP
wrapping and out of checkpoints. The GRPO module finds this callback on the trainer and calls :meth:`score`."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn


class RewardScorer(Callback):
    """Weighted sum of reward models, each ``reward(images [B, C, H, W] in [0, 1], prompts) -> [B]``.

    Args:
        rewards: name -> reward model (``class_path`` in YAML).
        weights: name -> weight; missing names weigh 1.
        normalize: z-normalise each component over the batch gathered from all ranks before weighting
            (the "mix" reward of the Precise recipes), so components on different scales count alike.
    """

    def __init__(self, rewards: dict[str, nn.Module], weights: dict[str, float] | None = None, normalize: bool = False):
        super().__init__()
        if not rewards:
            raise ValueError("RewardScorer needs at least one reward model")
        unknown = set(weights or {}) - set(rewards)
        if unknown:
            raise ValueError(f"weights name unknown rewards {sorted(unknown)}; rewards are {sorted(rewards)}")
        self.rewards = rewards
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in rewards}
        self.normalize = normalize
        self._trainer: Trainer | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer
        for model in self.rewards.values():
            model.to(pl_module.device).eval().requires_grad_(False)

    @torch.no_grad()
    def score(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """Total reward [B] (float32) and each component's raw value [B]."""
        components = {name: model(images, prompts).float() for name, model in self.rewards.items()}
        total = torch.zeros(len(images), device=images.device)
        for name, value in components.items():
            if self.normalize:
                gathered = self._trainer.strategy.all_gather(value).reshape(-1) if self._trainer else value
                value = (value - gathered.mean()) / (gathered.std() + 1e-6)
            total = total + self.weights[name] * value
        return total, components


def find_reward_scorer(trainer: Trainer) -> RewardScorer:
    scorers = [cb for cb in trainer.callbacks if isinstance(cb, RewardScorer)]
    if len(scorers) != 1:
        raise ValueError(
            f"GRPO needs exactly one RewardScorer in trainer.callbacks, found {len(scorers)}: add e.g. "
            "{class_path: precise_lightning.callbacks.RewardScorer, init_args: {rewards: {name: {class_path: ...}}}}"
        )
    return scorers[0]
