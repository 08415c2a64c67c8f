"""Evaluation image grids (with their prompts and rewards) to TensorBoard."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid


class ImageGridLogger(Callback):
    """Logs the first ``max_images`` evaluation images per validation run as one grid, captioned by prompt.

    Args:
        max_images: images in the grid.
        upscale: nearest-neighbour enlargement, so tiny images (the 8x8 demo) stay readable.
    """

    def __init__(self, max_images: int = 32, upscale: int = 1) -> None:
        super().__init__()
        if max_images < 1 or upscale < 1:
            raise ValueError("max_images and upscale must be >= 1")
        self.max_images, self.upscale = max_images, upscale
        self._images: list[torch.Tensor] = []
        self._captions: list[str] = []

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._images, self._captions = [], []

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        room = self.max_images - sum(len(i) for i in self._images)
        if room <= 0 or not outputs:
            return
        self._images.append(outputs["images"][:room].float().cpu())
        rewards = outputs["rewards"][:room].tolist()
        self._captions += [f"{p} — reward {r:.3f}" for p, r in zip(outputs["prompts"][:room], rewards)]

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self._images or not trainer.is_global_zero:
            return
        images = torch.cat(self._images)
        if self.upscale > 1:
            images = torch.nn.functional.interpolate(images, scale_factor=self.upscale, mode="nearest")
        grid = make_grid(images, nrow=8, padding=2, pad_value=0.5)
        # The x-axis self.log uses (training batches, i.e. rollouts), so grids line up with eval/reward.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("eval/samples", grid, step)
                caption = "\n".join(f"{i}. {c}" for i, c in enumerate(self._captions))
                logger.experiment.add_text("eval/prompts", caption.replace("\n", "  \n"), step)
