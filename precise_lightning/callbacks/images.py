"""Evaluation image grids (with their prompts and rewards) to TensorBoard, Weights & Biases and MLflow."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torchvision.utils import make_grid

IMAGE_LOGGERS = (TensorBoardLogger, WandbLogger, MLFlowLogger)


class ImageGridLogger(Callback):
    """Logs the first ``max_images`` evaluation images per validation run as one grid, captioned by prompt, to
    every configured logger that takes images (TensorBoard, W&B, MLflow); says at start-up which ones do not.

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

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        others = [type(lg).__name__ for lg in trainer.loggers if not isinstance(lg, IMAGE_LOGGERS)]
        if others:
            rank_zero_warn(f"ImageGridLogger: {', '.join(others)} cannot take images, so evaluation grids do not "
                           f"reach it; grids go to {', '.join(c.__name__ for c in IMAGE_LOGGERS)} when configured")

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
        grid = make_grid(images, nrow=8, padding=2, pad_value=0.5)  # [3, H, W] in [0, 1]
        caption = "\n".join(f"{i}. {c}" for i, c in enumerate(self._captions))
        # The x-axis self.log uses (training batches, i.e. rollouts), so grids line up with eval/reward (private:
        # Lightning exposes no public counter of it; global_step counts optimizer steps).
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            log_grid(logger, grid, caption, step)


def log_grid(logger: Logger, grid: torch.Tensor, caption: str, step: int) -> None:
    """One captioned image grid [3, H, W] in [0, 1] through the logger's own image call (others are skipped)."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image("eval/samples", grid, step)
        logger.experiment.add_text("eval/prompts", caption.replace("\n", "  \n"), step)  # markdown line breaks
    elif isinstance(logger, WandbLogger):
        logger.log_image("eval/samples", [grid], step=step, caption=[caption])
    elif isinstance(logger, MLFlowLogger):
        pixels = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # HWC uint8, as mlflow expects
        logger.experiment.log_image(logger.run_id, pixels, key="eval/samples", step=step)
        logger.experiment.log_text(logger.run_id, caption, f"eval/prompts_step_{step:06d}.txt")
