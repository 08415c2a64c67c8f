"""Prompt files and the LightningDataModule that serves them in GRPO groups.

A training item is one prompt; the collate function repeats it ``group_size`` times under one group id (the
prompt's index in the file). The sampler hands out whole prompts, so a group never straddles ranks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from precise_lightning.data.sampler import GlobalBatchSampler, ResumableLoader


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Read ``.txt`` (one prompt per line) or ``.jsonl`` (objects with a "prompt" key plus any metadata)."""
    path = Path(path)
    keys = "check data.train_file / data.eval_file"
    if path.is_dir():
        raise IsADirectoryError(f"prompt file {str(path)!r} is a directory: {keys} (a .txt or .jsonl file)")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist: {keys}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}): {keys}, "
                         "or re-save the file as UTF-8") from err
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f'{path}:{number}: each JSONL line needs a string "prompt" field')
            if not record["prompt"].strip():
                raise ValueError(f"{path}:{number}: empty prompt: remove the line or give it a prompt")
            records.append(record)
        else:
            records.append({"prompt": line.strip()})
    if not records:
        raise ValueError(f"prompt file {str(path)!r} has no prompts: write one prompt per line")
    return records


class PromptDataset(Dataset):
    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, **self.records[index]}


class GroupCollate:
    """Repeat each prompt ``group_size`` times under its group id (the prompt's index in its file).

    Batch: {"prompts": [B], "group_ids": [B], "sample_ids": [B] (index * group_size + repeat), "metadata": [B]}.
    """

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        repeated = [item for item in items for _ in range(self.group_size)]
        group_ids = torch.tensor([item["index"] for item in repeated], dtype=torch.long)
        return {
            "prompts": [item["prompt"] for item in repeated],
            "group_ids": group_ids,
            "sample_ids": group_ids * self.group_size + torch.arange(self.group_size).repeat(len(items)),
            "metadata": [{k: v for k, v in item.items() if k not in ("prompt", "index")} for item in repeated],
        }


class PromptDataModule(LightningDataModule):
    """Train prompts in groups and held-out eval prompts.

    Args:
        train_file: ``.txt`` or ``.jsonl`` prompts for training.
        eval_file: held-out prompts; if None, ``eval_fraction`` of the training prompts are held out instead.
        group_size: samples per prompt (G), at least 2 so that advantages are defined.
        batch_size: images per rank per iteration; a multiple of ``group_size``. Each iteration's global batch
            (``batch_size`` x ranks) is the same prompts however many ranks share it.
        eval_batch_size: eval images per rank per validation batch; a multiple of ``eval_repeats``.
        eval_repeats: images per held-out prompt, each from its own fixed noise.
        eval_fraction: share of ``train_file`` held out when no ``eval_file`` is given.
        seed: seed of that split and of the training prompt order (epoch ``e`` is shuffled with ``seed + e``).
    """

    def __init__(
        self,
        train_file: str,
        eval_file: str | None = None,
        group_size: int = 8,
        batch_size: int = 32,
        eval_batch_size: int = 32,
        eval_repeats: int = 1,
        eval_fraction: float = 0.0,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare samples of one prompt), got {group_size}")
        if batch_size < group_size or batch_size % group_size:
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of group_size ({group_size}): "
                f"e.g. {max(1, round(batch_size / group_size)) * group_size}"
            )
        if eval_repeats < 1 or eval_batch_size % eval_repeats:
            raise ValueError(
                f"eval_batch_size ({eval_batch_size}) must be a positive multiple of eval_repeats ({eval_repeats})"
            )
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        self.save_hyperparameters()
        train = read_prompts(train_file)  # read now: a bad path fails at config time, before any model loads
        if eval_file is not None:
            self.eval_records = read_prompts(eval_file)
        else:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
            held_out = int(len(train) * eval_fraction)
            self.eval_records = [train[i] for i in order[:held_out]]
            train = [train[i] for i in sorted(order[held_out:])]
        self.train_records = train
        if len(self.train_records) < batch_size // group_size:
            raise ValueError(
                f"{len(self.train_records)} training prompts cannot fill one batch of {batch_size // group_size} "
                f"prompts (batch_size {batch_size} / group_size {group_size}): add prompts or lower batch_size"
            )

    def setup(self, stage: str) -> None:
        """Checks that need the number of processes, before any model moves to a device."""
        ranks = self._ranks().get("num_replicas", 1)
        if stage == "fit":
            self._train_sampler()  # enough prompts for one global batch
        if len(self.eval_records) % ranks:
            raise ValueError(
                f"{len(self.eval_records)} evaluation prompts do not divide among {ranks} processes (Lightning would "
                "repeat some to even them out, biasing eval metrics): use a multiple of the number of processes"
            )

    def _ranks(self) -> dict[str, int]:
        return (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}

    def _train_sampler(self) -> GlobalBatchSampler:
        hp = self.hparams
        return GlobalBatchSampler(len(self.train_records), hp.batch_size // hp.group_size, seed=hp.seed, **self._ranks())

    def train_dataloader(self) -> ResumableLoader:
        hp = self.hparams
        return ResumableLoader(
            PromptDataset(self.train_records),
            batch_size=hp.batch_size // hp.group_size,
            sampler=self._train_sampler(),
            collate_fn=GroupCollate(hp.group_size),
            num_workers=hp.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.eval_records:
            return []
        return DataLoader(
            PromptDataset(self.eval_records),
            batch_size=self.hparams.eval_batch_size // self.hparams.eval_repeats,
            shuffle=False,
            collate_fn=GroupCollate(self.hparams.eval_repeats),
            num_workers=self.hparams.num_workers,
        )
