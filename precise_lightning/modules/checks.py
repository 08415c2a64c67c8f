"""Batch arithmetic: the micro-batch split, which must hold before any model loads (checked when the config is
parsed, and again by the module on the data it actually receives), and which micro-batches each optimizer step
takes, and with what weight."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from precise_lightning.modules.losses import KL_FORMS, LOG_PROB_FORMS


def check_settings(**settings: Any) -> None:
    """The module's scalar settings, each checked on its own value (by the module, and at parse time from the
    config, before any model loads): ``clip_range=...``, ``inner_epochs=...``, any subset of the module's."""
    rules = {
        "clip_range": (lambda v: v > 0, "> 0"),
        "adv_clip_max": (lambda v: v > 0, "> 0"),
        "beta": (lambda v: v >= 0, ">= 0"),
        "kl_form": (lambda v: v in KL_FORMS, f"one of {list(KL_FORMS)}"),
        "kl_eta": (lambda v: v > 0, "> 0"),
        "log_prob_form": (lambda v: v in LOG_PROB_FORMS, f"one of {list(LOG_PROB_FORMS)}"),
        "ratio_norm": (lambda v: isinstance(v, bool), "true or false"),
        "std_scope": (lambda v: v in ("group", "global"), "'group' or 'global'"),
        "std_eps": (lambda v: v > 0, "> 0"),
        "train_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "inner_epochs": (lambda v: v >= 1, ">= 1"),
        "micro_batch_size": (lambda v: v is None or v >= 1, ">= 1 (or null: the whole batch)"),
        "updates_per_rollout": (lambda v: v >= 1, ">= 1"),
        "max_grad_norm": (lambda v: v is None or v > 0, "> 0 or null"),
        "max_bad_iterations": (lambda v: v >= 1, ">= 1"),
    }
    for name, value in settings.items():
        ok, wanted = rules[name]
        if not ok(value):
            raise ValueError(f"model.{name} must be {wanted}, got {value!r}")
    if settings.get("ratio_norm") and settings.get("log_prob_form", "gaussian") != "gaussian":
        raise ValueError(f"model.log_prob_form {settings['log_prob_form']!r} sets the PPO ratio, which "
                         "model.ratio_norm replaces by its own: set one of them (ratio_norm false for the CPS code's)")


def micro_slices(batch_size: int, micro_batch_size: int | None, updates_per_rollout: int) -> list[slice]:
    """Equal micro-batches (equal loss weights per sample), a whole number per optimizer step."""
    micro = micro_batch_size or batch_size
    if batch_size % micro or (batch_size // micro) % updates_per_rollout:
        raise ValueError(
            f"data.batch_size ({batch_size}) must split into micro-batches of {micro} (model.micro_batch_size) "
            f"whose number is a multiple of model.updates_per_rollout ({updates_per_rollout})"
        )
    return [slice(i, i + micro) for i in range(0, batch_size, micro)]


def check_precision(precision: Any) -> None:
    """Pure float16 weights (``16-true``) are refused: an AdamW step on half-precision weights rounds small updates
    away. ``16-mixed`` keeps float32 weights and scales the loss (Lightning's GradScaler), ``bf16-mixed`` needs
    no scaling."""
    if str(precision) == "16-true":
        raise ValueError("trainer.precision '16-true' trains float16 weights, whose small updates round away: use "
                         "16-mixed (float32 weights, fp16 compute, loss scaling) or bf16-mixed")


def update_groups(num_slices: int, updates_per_rollout: int) -> list[range]:
    """The micro-batches of each optimizer step: update k takes k, k + U, ... Every rank holds a whole number of
    such strides, so each optimizer step sees the same samples however many ranks share the global batch."""
    return [range(k, num_slices, updates_per_rollout) for k in range(updates_per_rollout)]


def update_plan(
    group: range, live: list[bool] | None, num_steps: int, strategy: Any
) -> tuple[list[tuple[int, float]], float, Tensor]:
    """The micro-batches one optimizer step runs with their weights, the loss scale, and how many were dropped.

    ``live`` None: all of ``group``, each weighing ``1 / (micro-batches x steps)`` (the all-reduce then averages
    over processes). Else micro-batches whose ``live`` is False (every sample's advantage is 0) are dropped and the
    kept ones weigh ``processes / (kept over all processes x steps)``, so 1 process, DDP and FSDP2 compute the same
    update; a process that kept fewer than another runs some dropped ones with weight 0, so that every process
    runs as many forwards and backwards (the collectives of DDP and FSDP2 pair up). Nothing kept anywhere: no plan.
    """
    device = strategy.root_device
    if live is None:
        return [(m, 1.0) for m in group], 1.0 / (len(group) * num_steps), torch.zeros((), device=device)
    kept = [m for m in group if live[m]]
    count = torch.tensor(float(len(kept)), device=device)
    total = int(strategy.reduce(count.clone(), reduce_op="sum"))
    most = int(strategy.reduce(count.clone(), reduce_op="max"))
    dropped = torch.tensor(float(len(group) * strategy.world_size - total), device=device)
    if total == 0:
        return [], 0.0, dropped
    standins = [m for m in group if not live[m]][: most - len(kept)]
    plan = [(m, 1.0) for m in kept] + [(m, 0.0) for m in standins]
    return plan, strategy.world_size / (total * num_steps), dropped
