"""The GRPO LightningModule and its parts: the PPO update, losses, evaluation, the memory guard."""

from precise_lightning.modules.grpo import GRPOModule

__all__ = ["GRPOModule"]
