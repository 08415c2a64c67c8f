"""Reward scoring. The reward models live here, not in the LightningModule: out of the optimizer, out of FSDP
wrapping and out of checkpoints. The GRPO module finds this callback on the trainer and calls :meth:`score` on
rollouts and evaluation images, and :meth:`evaluate` on evaluation images only."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from precise_lightning.rewards.remote import uint8_images
from precise_lightning.rewards.reward import Reward


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
        overlap: score the rewards that wait on a server (``io_bound = True``: GenEval, VLM judges) in a background
            thread, each micro-batch as soon as it is decoded, while the next one samples. Rewards computed here
            score each micro-batch at once in the training thread: a second thread computing on the same CPU
            cores or GPU stream slows sampling more than it hides. Results are the same either way.
    """

    def __init__(
        self,
        rewards: dict[str, Reward],
        weights: dict[str, float] | None = None,
        normalize: bool = False,
        metrics: dict[str, Reward] | None = None,
        overlap: bool = True,
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
        self.overlap = overlap
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

    def start_round(
        self, prompts: list[str], metadata: list[dict[str, Any]] | None = None, evaluating: bool = False
    ) -> ScoringRound:
        """Scoring of one rollout's images, handed over micro-batch by micro-batch (see ``overlap``)."""
        return ScoringRound(self, prompts, metadata, evaluating)

    @torch.no_grad()
    def score(
        self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None,
        evaluating: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total reward [B] (float32) and, per image, each component's raw value and each component's details
        (``<name>/<detail>``, NaN where a detail does not apply). ``metadata`` (a JSONL prompt file's other
        fields, one dict per image) reaches the rewards whose class sets ``wants_metadata = True``; ``evaluating``
        (evaluation images, not rollouts) those that set ``wants_evaluating = True``."""
        scoring = self.start_round(prompts, metadata, evaluating)
        scoring.submit(slice(0, len(prompts)), images)
        return scoring.result()

    def combine(self, components: dict[str, Tensor]) -> Tensor:
        """The total reward [B] of the components [B] (optionally z-normalised over all ranks), weighted."""
        total = torch.zeros_like(components[next(iter(self.rewards))])
        for name in self.rewards:
            value = components[name]
            if self.normalize:  # over the scored images (an abstaining reward's NaN rows stay NaN), as published
                gathered = self._trainer.strategy.all_gather(value).reshape(-1) if self._trainer else value
                gathered = gathered[torch.isfinite(gathered)]
                if gathered.numel():
                    value = (value - gathered.mean()) / (gathered.std(unbiased=False) + 1e-8)  # numpy's std
            total = total + self.weights[name] * value
        return total

    def abstained(self, components: dict[str, Tensor]) -> Tensor:
        """[B] bool: the images a trained reward that may abstain (``Reward.may_abstain``) gave no score (NaN)."""
        out = torch.zeros_like(components[next(iter(self.rewards))], dtype=torch.bool)
        for name, model in self.rewards.items():
            if getattr(model, "may_abstain", False):
                out |= ~torch.isfinite(components[name])
        return out

    @torch.no_grad()
    def evaluate(
        self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> dict[str, Tensor]:
        """Each held-out metric [B] (float32) and its details."""
        values, details = _score_all(self.metrics, images, prompts, metadata, evaluating=True)
        return values | details


# Micro-batches scored at once in the background. Measured on 2 CPU cores (README, benchmarks/overlap.py): 2 hid
# the most; 4 and 8 slowed sampling more (their JPEG and HTTP work competes with it) for no further gain.
BACKGROUND_MICRO_BATCHES = 2


class ScoringRound:
    """One rollout's scoring: :meth:`submit` each micro-batch's images as they are decoded, then :meth:`result`.

    Local reward models score a micro-batch at once; I/O-bound ones (``io_bound = True``) in background threads
    (up to ``BACKGROUND_MICRO_BATCHES`` micro-batches at once) when the scorer's ``overlap`` is on, given the
    images as uint8 pixels [b, H, W, 3] made here: a GPU copy made there would queue behind the next micro-batch's
    sampling, and any torch op there starts a second OpenMP team that made the training thread's small ops 3x
    slower on 2 cores (``benchmarks/overlap.py``). Such a reward must accept those pixels
    (``rewards.remote.uint8_images``). ``inline_seconds``: time spent scoring here.
    """

    def __init__(
        self, scorer: RewardScorer, prompts: list[str], metadata: list[dict[str, Any]] | None, evaluating: bool
    ) -> None:
        self.scorer, self.prompts, self.metadata, self.evaluating = scorer, prompts, metadata, evaluating
        io_bound = {n for n, m in scorer.rewards.items() if getattr(m, "io_bound", False)} if scorer.overlap else set()
        self.inline = {n: m for n, m in scorer.rewards.items() if n not in io_bound}
        self.background = {n: m for n, m in scorer.rewards.items() if n in io_bound}
        # Several micro-batches at once: each reward bounds its own requests in flight over all of them.
        self.pool = ThreadPoolExecutor(BACKGROUND_MICRO_BATCHES, thread_name_prefix="reward") if self.background \
            else None
        self.parts: list[tuple[tuple[dict[str, Tensor], dict[str, Tensor]], Future | None]] = []
        self.inline_seconds = 0.0
        self.device = torch.device("cpu")

    @torch.no_grad()
    def submit(self, rows: slice, images: Tensor) -> None:
        """Score ``images`` [b, C, H, W], the rollout's rows ``rows`` (in order, each row once)."""
        prompts = self.prompts[rows]
        metadata = self.metadata[rows] if self.metadata is not None else None
        self.device = images.device
        start = time.perf_counter()
        now = _score_all(self.inline, images, prompts, metadata, self.evaluating)
        later = None
        if self.pool is not None:
            pixels = uint8_images(images)  # here: a torch op in a second thread slowed this one 3x on 2 cores
            later = self.pool.submit(_score_all, self.background, pixels, prompts, metadata, self.evaluating)
        self.inline_seconds += time.perf_counter() - start
        self.parts.append((now, later))

    def close(self) -> None:
        """Drop micro-batches not yet scored (a request in flight finishes in the background); idempotent."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def result(self) -> tuple[Tensor, dict[str, Tensor]]:
        """Total reward [B] and components, as :meth:`RewardScorer.score` returns them for the whole batch."""
        columns: dict[str, list[Tensor]] = {name: [] for name in self.scorer.component_names()}
        try:
            for (scores, details), later in self.parts:
                if later is not None:
                    more_scores, more_details = later.result()
                    scores, details = scores | more_scores, details | more_details
                for name, value in (scores | details).items():
                    columns[name].append(value)
        finally:
            self.close()
        components = {name: torch.cat([v.to(self.device) for v in values]) for name, values in columns.items()}
        return self.scorer.combine(components), components


def _detail_names(models: dict[str, nn.Module]) -> list[str]:
    return [f"{name}/{detail}" for name, model in models.items() for detail in getattr(model, "detail_names", ())]


def _score_all(
    models: dict[str, nn.Module], images: Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None,
    evaluating: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Each model's scores [B] and the details of those that declare ``detail_names`` (``<name>/<detail>``)."""
    scores, details = {}, {}
    for name, model in models.items():
        scores[name], own = _call(name, model, images, prompts, metadata, evaluating)
        details |= {f"{name}/{detail}": value for detail, value in own.items()}
    return scores, details


def _call(
    name: str, model: nn.Module, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None,
    evaluating: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One reward model's scores [B] (float32) and details; its failure is reported with the reward's name and the
    prompts. A model with ``detail_names`` returns ``(scores, {detail: [B]})``, exactly those details."""
    kwargs: dict[str, Any] = {}
    if getattr(model, "wants_metadata", False):
        kwargs["metadata"] = metadata or [{} for _ in prompts]
    if getattr(model, "wants_evaluating", False):
        kwargs["evaluating"] = evaluating
    try:
        # Not under the training precision's autocast (scoring runs inside training_step): reward models compute in
        # their own dtype, as the published trainers score them in worker threads, where no autocast acts.
        with torch.autocast(torch.device(getattr(images, "device", "cpu")).type, enabled=False):
            out = model(images, prompts, **kwargs)
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
