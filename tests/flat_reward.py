"""A demo reward with flat groups, for tests launched as subprocesses (``class_path: flat_reward.FlatDigitsReward``):
the digit classifier's reward, but a constant 1 for prompts of ``flat_digits``, whose groups then carry no signal."""

from torch import Tensor

from precise_lightning.data.digits import digit_labels
from precise_lightning.rewards import DigitClassifierReward


class FlatDigitsReward(DigitClassifierReward):
    def __init__(self, flat_digits: list[int] = (4, 6)) -> None:
        super().__init__()
        self.flat_digits = list(flat_digits)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        rewards = super().forward(images, prompts)
        flat = sum(digit_labels(prompts, rewards.device) == d for d in self.flat_digits).bool()
        return rewards.masked_fill(flat, 1.0)
