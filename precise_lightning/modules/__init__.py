"""LightningModule, policies and GRPO losses."""

from precise_lightning.modules.digits import DigitsPolicy
from precise_lightning.modules.grpo import GRPOModule
from precise_lightning.modules.policy import Policy

__all__ = ["DigitsPolicy", "GRPOModule", "Policy"]
