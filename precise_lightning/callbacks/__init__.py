"""Lightning callbacks: reward scoring, EMA of the trainable weights, evaluation image grids, export, progress,
preemption."""

from precise_lightning.callbacks.ema import EMA
from precise_lightning.callbacks.export import DiffusersExport
from precise_lightning.callbacks.images import ImageGridLogger
from precise_lightning.callbacks.preemption import Preemption
from precise_lightning.callbacks.progress import RolloutProgressBar
from precise_lightning.callbacks.rewards import RewardScorer, find_reward_scorer

__all__ = ["DiffusersExport", "EMA", "ImageGridLogger", "Preemption", "RewardScorer", "RolloutProgressBar", "find_reward_scorer"]
