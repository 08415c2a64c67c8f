"""Prompt order for training: the same global batches however many ranks share them, and resumable mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler


class GlobalBatchSampler(DistributedSampler):
    """Prompt indices for one rank: epoch ``e`` shuffles all prompts with seed ``seed + e``; global batch ``b`` is
    the slice ``[b * P * W, (b + 1) * P * W)`` of that order and rank ``r`` takes its ``r``-th chunk of ``P``.

    So the union of the ranks' batches, and with it the update, does not depend on the number of ranks ``W``
    (one process with ``P * W`` prompts per batch sees exactly the same prompts). The last incomplete global batch
    of an epoch is dropped. A ``DistributedSampler`` so that Lightning neither replaces it nor shards it again, and
    calls :meth:`set_epoch`.
    """

    def __init__(self, num_prompts: int, prompts_per_rank: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        per_step = prompts_per_rank * num_replicas
        if num_prompts < per_step:
            raise ValueError(
                f"{num_prompts} training prompts cannot fill one global batch of {per_step} prompts "
                f"({prompts_per_rank} per rank x {num_replicas} ranks): add prompts, lower data.batch_size or use fewer processes"
            )
        super().__init__(range(num_prompts), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.prompts_per_rank = prompts_per_rank
        self.batches_per_epoch = num_prompts // per_step
        self.num_samples = self.batches_per_epoch * prompts_per_rank
        self.resume_at = (0, 0)  # (epoch, batch) a resumed run starts from; applies to that epoch only

    @property
    def start_batch(self) -> int:
        epoch, batch = self.resume_at
        return batch if epoch == self.epoch else 0

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        per, start, self.resume_at = self.prompts_per_rank, self.start_batch, (0, 0)
        for b in range(start, self.batches_per_epoch):
            first = (b * self.num_replicas + self.rank) * per
            yield from order[first : first + per].tolist()

    def __len__(self) -> int:
        return self.num_samples


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`GlobalBatchSampler` that counts the batches it has handed out this epoch.

    Lightning stores :meth:`state_dict` in checkpoints and calls :meth:`load_state_dict` before iterating on
    resume, so a run restarted mid-epoch continues with the next unseen batch.
    """

    sampler: GlobalBatchSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches = 0

    def __iter__(self) -> Iterator[Any]:
        self._batches = self.sampler.start_batch
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.sampler.resume_at = (state["epoch"], state["batches"])
