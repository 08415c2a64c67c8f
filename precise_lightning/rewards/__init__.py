"""Reward models: each is a :class:`Reward`, ``reward(images [B, C, H, W] in [0, 1], prompts) -> tensor[B]``
(float32, no grad).

PickScore, HPSv2.1, HPSv3, CLIPScore, ImageReward and the aesthetic score return the metric as the papers report it;
the demo's digit classifier returns a probability; the JPEG rewards need no weights; the OCR reward reads the
prompt's quoted text with an OCR engine (its models ship in its wheel); GenEval and UnifiedReward are
scored by servers the user runs (they return their parts too: ``detail_names``). Mixes and held-out metrics are
configured on :class:`precise_lightning.callbacks.RewardScorer`.
"""

from precise_lightning.rewards.aesthetic import AestheticScore
from precise_lightning.rewards.clip import CLIPScore, PickScore, PreciseCLIPScore
from precise_lightning.rewards.digits import DigitClassifierReward
from precise_lightning.rewards.geneval import GenEvalReward
from precise_lightning.rewards.hpsv2 import HPSv2
from precise_lightning.rewards.hpsv3 import HPSv3
from precise_lightning.rewards.imagereward import ImageReward
from precise_lightning.rewards.jpeg import JPEGCompressibility, JPEGIncompressibility
from precise_lightning.rewards.ocr import OCRReward
from precise_lightning.rewards.preprocess import ClipPreprocess
from precise_lightning.rewards.remote import RemoteRewardError
from precise_lightning.rewards.reward import Reward
from precise_lightning.rewards.unified_reward import UnifiedReward

__all__ = [
    "AestheticScore", "CLIPScore", "ClipPreprocess", "DigitClassifierReward", "GenEvalReward", "HPSv2", "HPSv3",
    "ImageReward", "JPEGCompressibility", "JPEGIncompressibility", "OCRReward", "PickScore", "PreciseCLIPScore",
    "RemoteRewardError", "Reward", "UnifiedReward",
]
