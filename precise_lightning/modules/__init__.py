"""LightningModule, policies and GRPO losses."""

from precise_lightning.modules.digits import DigitsPolicy
from precise_lightning.modules.flux1 import FluxPolicy
from precise_lightning.modules.flux2 import Flux2KleinPolicy
from precise_lightning.modules.grpo import GRPOModule
from precise_lightning.modules.policy import Policy
from precise_lightning.modules.sd3 import SD3Policy

__all__ = ["DigitsPolicy", "Flux2KleinPolicy", "FluxPolicy", "GRPOModule", "Policy", "SD3Policy"]
