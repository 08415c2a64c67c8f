"""What a GRPO iteration logs to TensorBoard (``train/*``, ``perf/*``), as values of the whole global batch."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

# Extremes, not means, are what matter for these diagnostics (ratio_drift_first must be exactly 0); over ranks too.
_REDUCE = {"ratio_max": "max", "ratio_max_dev": "max", "ratio_drift_first": "max", "ratio_min": "min"}


def log_iteration(
    module: LightningModule, rewards: Tensor, components: dict[str, Tensor], advantages: Tensor, flat_groups: Tensor,
    stats: dict[str, list[Tensor]], seconds: float, scored: Tensor | None = None,
) -> None:
    """Log one GRPO iteration: rewards and their spread over all ranks (of the scored images: ``scored`` [B] is
    False where a reward gave none), advantage health, update diagnostics (reduced over ranks: means, or extremes
    where those matter), skipped updates and throughput."""
    batch_size = len(rewards)
    log = dict(on_step=True, batch_size=batch_size)
    scored = torch.ones_like(rewards, dtype=torch.bool) if scored is None else scored
    kept = module.all_gather(scored).reshape(-1)
    mean = _reduce_over_ranks(module, [rewards[scored]], "mean")
    if mean is not None:  # None: no image of the batch was scored
        module.log("train/reward", mean, prog_bar=True, **log)
    module.log("train/reward_std", module.all_gather(rewards).reshape(-1)[kept].float().std(unbiased=False), **log)
    module.log("train/unscored_images", (~scored).float().sum(), reduce_fx="sum", sync_dist=True, **log)
    for name, value in components.items():
        # NaN: a reward's detail where it does not apply, a reward where it gave no score; the mean of the rest
        mean = _reduce_over_ranks(module, [value[~value.isnan()]], "mean")
        if mean is not None:
            module.log(f"train/reward_{name}", mean, **log)
        if "/" not in name:  # a reward, not a detail: its spread over all ranks too
            gathered = module.all_gather(value).reshape(-1)
            module.log(f"train/reward_{name}_std", gathered[~gathered.isnan()].float().std(unbiased=False), **log)
    module.log("train/zero_advantage_fraction", (advantages == 0).float().mean(), sync_dist=True, **log)
    module.log("train/flat_groups", flat_groups, reduce_fx="sum", sync_dist=True, **log)  # all rewards equal
    module.log("train/skipped_updates", float(module.guard.skipped), **log)
    for key in sorted(stats):  # the same order on every process: each reduction is a collective
        value = _reduce_over_ranks(module, stats[key], _REDUCE.get(key, "mean"))
        if value is not None:
            module.log(f"train/{key}", value, **log)  # already the whole batch's value
    module.log("perf/s_per_rollout", seconds, prog_bar=True, **log)
    module.log("perf/images_per_s", batch_size * module.trainer.world_size / seconds, **log)
    if module.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(module.device) / 2**30
        module.log("perf/peak_memory_gib", peak, reduce_fx="max", sync_dist=True, **log)


def _reduce_over_ranks(module: LightningModule, values: list[Tensor], reduce: str) -> Tensor | None:
    """Mean (over every value of every process, however many each has), max or min of a diagnostic; None when no
    process has a value (e.g. every micro-batch of the rollout was dropped)."""
    local = torch.stack(values).float().reshape(-1) if values else torch.zeros(0, device=module.device)
    strategy = module.trainer.strategy
    if reduce == "mean":
        total, count = strategy.reduce(torch.stack([local.sum(), local.new_tensor(float(local.numel()))]), reduce_op="sum")
        return total / count if count > 0 else None
    empty = float("-inf") if reduce == "max" else float("inf")
    value = strategy.reduce(getattr(local, reduce)() if local.numel() else local.new_tensor(empty), reduce_op=reduce)
    return value if torch.isfinite(value) else None
