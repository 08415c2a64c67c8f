"""Evaluation of a GRPO run: the starting weights inside ``fit``, and each named reading of the evaluation prompts
(the ``eval_sampler``'s and the extras'), on fixed noise, with the weights the EMA callback swaps in."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric

from precise_lightning.callbacks.rewards import RewardScorer
from precise_lightning.policies.base import Policy
from precise_lightning.sampling import Sampler


class Evaluation(LightningModule):
    """Validation hooks of :class:`~precise_lightning.modules.GRPOModule`, which sets the attributes below and the
    ``eval_seed`` / ``eval_at_start`` hparams."""

    policy: Policy
    scorer: RewardScorer | None
    eval_sampler: Sampler
    extra_eval_samplers: dict[str, Sampler]
    eval_means: nn.ModuleDict
    rollouts: int

    def on_train_start(self) -> None:
        trainer = self.trainer
        if not self.hparams.eval_at_start or self.rollouts or not trainer.enable_validation:
            return
        # What Lightning's training loop does around its own mid-epoch validation (private: no public hook runs a
        # validation before the first training batch and leaves the loop's logging state as it was).
        trainer.validating = True
        first_loop_iter = trainer._logger_connector._first_loop_iter
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter

    def make_eval_means(self, scorer: RewardScorer) -> nn.ModuleDict:
        """One MeanMetric per logged evaluation tag: each reading's reward, reward components and held-out metrics."""
        names = ["reward", *(f"reward_{n}" for n in scorer.component_names()), *scorer.metric_names()]
        # A reward's details are NaN where they do not apply (another GenEval tag): left out of their mean.
        return nn.ModuleDict({_key(f"{prefix}/{name}"): MeanMetric(nan_strategy="ignore" if "/" in name else "warn")
                              for prefix in self._eval_prefixes() for name in names})

    def _eval_prefixes(self) -> dict[str, Sampler]:
        """Each evaluation reading's tag prefix and sampler: ``eval`` first (the one the grid shows), then extras."""
        return {"eval": self.eval_sampler} | {f"eval/{n}": s for n, s in self.extra_eval_samplers.items()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        prompts, ids, metadata = batch["prompts"], batch["sample_ids"], batch.get("metadata")
        seed = self.hparams.eval_seed * 1_000_003
        noise = torch.stack(
            [torch.randn(self.policy.latent_shape, generator=torch.Generator().manual_seed(seed + int(i))) for i in ids]
        ).to(self.device)
        with torch.no_grad():
            cond = self.policy.encode(prompts)
        outputs = {}
        for prefix, sampler in self._eval_prefixes().items():
            generator = torch.Generator(device=self.device).manual_seed(seed + int(ids[0]))  # fixed per batch
            with torch.no_grad():
                traj = sampler.sample(lambda x, t: self.policy.velocity(x, t, cond), noise, generator=generator)
                images = self.policy.decode(traj.latents[-1])
            rewards, components = self.scorer.score(images, prompts, metadata, evaluating=True)
            values = {"reward": rewards} | {f"reward_{n}": v for n, v in components.items()}
            for name, value in (values | self.scorer.evaluate(images, prompts, metadata)).items():
                self.eval_means[_key(f"{prefix}/{name}")].update(value)
            outputs = outputs or {"images": images, "prompts": prompts, "rewards": rewards}
        return outputs

    def on_validation_epoch_end(self) -> None:
        for key, metric in self.eval_means.items():
            tag = key.replace(":", "/")  # the inverse of _key
            value = metric.compute()  # synced over ranks: the same on each, so the same tags are logged on each
            if not torch.isnan(value):  # NaN: a detail that applied to no evaluation image
                self.log(tag, value, prog_bar=tag == "eval/reward")  # held-out metrics: never trained on
            metric.reset()


def _key(tag: str) -> str:
    """A logged tag as a ModuleDict key (keys cannot hold "/"); ``on_validation_epoch_end`` turns it back."""
    return tag.replace("/", ":")
