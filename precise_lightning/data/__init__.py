"""Prompt data: files, group collation and the LightningDataModule."""

from precise_lightning.data.prompts import PromptDataModule, read_prompts

__all__ = ["PromptDataModule", "read_prompts"]
