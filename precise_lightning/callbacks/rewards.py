"""Reward scoring. The reward models live here, not in the LightningModule: out of the optimizer, out of FSDP
wrapping and out of checkpoints. The GRPO module finds this callback on the trainer and calls :meth:`score` on
rollouts and evaluation images, and :meth:`evaluate` on evaluation images only."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn


class RewardScorer(Callback):
    """Training reward = weighted sum of reward models, each ``reward(images [B, C, H, W] in [0, 1], prompts) -> [B]``.

    The two published mixes:

    - z-normalised (the Precise code's FLUX.2 Klein "mix", ``normalize_rewards = True``): ``normalize: true``, each
      component standardised over the batch gathered from all ranks with the population std,
      ``(r - mean) / (std + 1e-8)``, then weighted (weights 1 there), so components on different scales count
      alike and a component's scale (PickScore's /26, CLIPScore's /30 in that code) does not matter;
    - raw weighted sum: ``normalize: false`` and weights that carry the scales.

    Args:
        rewards: name -> reward model (``class_path`` in YAML), scored on every rollout.
        weights: name -> weight; missing names weigh 1.
        normalize: z-normalise each component over the gathered batch before weighting (see above).
        metrics: name -> held-out metric, scored on evaluation images only (never on rollouts, never trained on)
            and logged as ``eval/<name>``; e.g. HPSv2.1 and CLIPScore for a run trained on PickScore.
    """

    def __init__(
        self,
        rewards: dict[str, nn.Module],
        weights: dict[str, float] | None = None,
        normalize: bool = False,
        metrics: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if not rewards:
            raise ValueError("RewardScorer needs at least one reward model (reward.rewards)")
        unknown = set(weights or {}) - set(rewards)
        if unknown:
            raise ValueError(f"reward.weights name unknown rewards {sorted(unknown)}; rewards are {sorted(rewards)}")
        clash = set(metrics or {}) & set(rewards)
        if clash:
            raise ValueError(
                f"reward.metrics {sorted(clash)} are also training rewards, whose evaluation values are logged as "
                "eval/reward_<name> already: remove them from reward.metrics"
            )
        self.rewards = rewards
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in rewards}
        self.normalize = normalize
        self.metrics = metrics or {}
        self._trainer: Trainer | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer
        for model in [*self.rewards.values(), *self.metrics.values()]:
            model.to(pl_module.device).eval().requires_grad_(False)

    def component_names(self) -> list[str]:
        """What :meth:`score` returns per image besides the total: each reward, then each reward's details."""
        return [*self.rewards, *_detail_names(self.rewards)]

    def metric_names(self) -> list[str]:
        """What :meth:`evaluate` returns per image: each held-out metric, then each metric's details."""
        return [*self.metrics, *_detail_names(self.metrics)]

    @torch.no_grad()
    def score(
        self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total reward [B] (float32) and, per image, each component's raw value and each component's details
        (``<name>/<detail>``, NaN where a detail does not apply). ``metadata`` (a JSONL prompt file's other
        fields, one dict per image) reaches the rewards whose class sets ``wants_metadata = True``."""
        components, details = _score_all(self.rewards, images, prompts, metadata)
        total = torch.zeros(len(images), device=images.device)
        for name, value in components.items():
            if self.normalize:
                gathered = self._trainer.strategy.all_gather(value).reshape(-1) if self._trainer else value
                value = (value - gathered.mean()) / (gathered.std(unbiased=False) + 1e-8)  # numpy's std, as published
            total = total + self.weights[name] * value
        return total, components | details

    @torch.no_grad()
    def evaluate(
        self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> dict[str, Tensor]:
        """Each held-out metric [B] (float32) and its details."""
        values, details = _score_all(self.metrics, images, prompts, metadata)
        return values | details


def _detail_names(models: dict[str, nn.Module]) -> list[str]:
    return [f"{name}/{detail}" for name, model in models.items() for detail in getattr(model, "detail_names", ())]


def _score_all(
    models: dict[str, nn.Module], images: Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Each model's scores [B] and the details of those that declare ``detail_names`` (``<name>/<detail>``)."""
    scores, details = {}, {}
    for name, model in models.items():
        scores[name], own = _call(name, model, images, prompts, metadata)
        details |= {f"{name}/{detail}": value for detail, value in own.items()}
    return scores, details


def _call(
    name: str, model: nn.Module, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """One reward model's scores [B] (float32) and details; its failure is reported with the reward's name and the
    prompts. A model with ``detail_names`` returns ``(scores, {detail: [B]})``, exactly those details."""
    try:
        if getattr(model, "wants_metadata", False):
            out = model(images, prompts, metadata=metadata or [{} for _ in prompts])
        else:
            out = model(images, prompts)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:
        shown = ", ".join(repr(p) for p in prompts[:3]) + (f" and {len(prompts) - 3} more" if len(prompts) > 3 else "")
        raise RuntimeError(f"reward {name!r} ({type(model).__name__}) failed on prompts {shown}: {err}") from err
    declared = tuple(getattr(model, "detail_names", ()))
    scores, details = out if declared else (out, {})
    if set(details) != set(declared):
        raise ValueError(f"reward {name!r} returned details {sorted(details)}, declared {sorted(declared)}")
    for key, value in {name: scores, **details}.items():
        if value.shape != (len(images),):
            raise ValueError(f"reward {name!r} returned shape {tuple(value.shape)} for {key!r}, expected "
                             f"({len(images)},)")
    return scores.float(), {key: value.float() for key, value in details.items()}


def find_reward_scorer(trainer: Trainer) -> RewardScorer:
    scorers = [cb for cb in trainer.callbacks if isinstance(cb, RewardScorer)]
    if len(scorers) != 1:
        raise ValueError(
            f"GRPO needs exactly one RewardScorer, found {len(scorers)}: give the config a `reward:` section, e.g. "
            "{rewards: {name: {class_path: precise_lightning.rewards.PickScore}}} (cli.py registers it)"
        )
    return scorers[0]
