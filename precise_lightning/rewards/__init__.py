"""Reward models: each is ``reward(images [B, C, H, W] in [0, 1], prompts) -> tensor[B]``."""

from precise_lightning.rewards.digits import DigitClassifierReward

__all__ = ["DigitClassifierReward"]
