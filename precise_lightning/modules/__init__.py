"""The GRPO LightningModule and its parts: the PPO update, losses, evaluation, the memory guard, and DiffusionNFT's
objective that can replace the PPO update (``model.objective``)."""

from precise_lightning.modules.grpo import GRPOModule
from precise_lightning.modules.nft import DiffusionNFT

__all__ = ["DiffusionNFT", "GRPOModule"]
