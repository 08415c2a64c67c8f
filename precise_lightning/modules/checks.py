"""Batch arithmetic: the micro-batch split, which must hold before any model loads (checked when the config is
parsed, and again by the module on the data it actually receives), and which micro-batches each optimizer step
takes."""

from __future__ import annotations


def micro_slices(batch_size: int, micro_batch_size: int | None, updates_per_rollout: int) -> list[slice]:
    """Equal micro-batches (equal loss weights per sample), a whole number per optimizer step."""
    micro = micro_batch_size or batch_size
    if batch_size % micro or (batch_size // micro) % updates_per_rollout:
        raise ValueError(
            f"data.batch_size ({batch_size}) must split into micro-batches of {micro} (model.micro_batch_size) "
            f"whose number is a multiple of model.updates_per_rollout ({updates_per_rollout})"
        )
    return [slice(i, i + micro) for i in range(0, batch_size, micro)]


def update_groups(num_slices: int, updates_per_rollout: int) -> list[range]:
    """The micro-batches of each optimizer step: update k takes k, k + U, ... Every rank holds a whole number of
    such strides, so each optimizer step sees the same samples however many ranks share the global batch."""
    return [range(k, num_slices, updates_per_rollout) for k in range(updates_per_rollout)]
