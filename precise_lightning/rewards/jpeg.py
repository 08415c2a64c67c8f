"""DDPO's JPEG rewards, as the Precise code defines them (``precise_sde/rewards/builtin.py``): an image's size in
kilobytes when saved as JPEG at quality 95. They need no weights, so they are the reward of the CPU smoke test."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from precise_lightning.rewards.preprocess import to_uint8
from precise_lightning.rewards.reward import Reward


def jpeg_bytes(image: np.ndarray, quality: int, size: int | None = None) -> bytes:
    """One [H, W, 3] (or grey [H, W]) uint8 image as JPEG, resized to ``size`` x ``size`` first (PIL's default
    filter) if given."""
    picture = Image.fromarray(image)
    if size is not None:
        picture = picture.resize((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_kilobytes(images: Tensor, quality: int = 95) -> Tensor:
    """Size in kB (1000 bytes) of each image [B, C, H, W] in [0, 1] (C = 1 or 3), rounded to uint8 and saved as JPEG
    with PIL at ``quality`` -> [B] float32 on the images' device."""
    pixels = to_uint8(images).cpu().numpy()  # [B, C, H, W]
    arrays = [image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0)) for image in pixels]
    sizes = [len(jpeg_bytes(array, quality)) / 1000 for array in arrays]
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JPEGIncompressibility(Reward):
    """Reward: the JPEG size in kB (larger images score higher: detail, texture, noise)."""

    def __init__(self, quality: int = 95) -> None:
        super().__init__()
        if not 1 <= quality <= 95:
            raise ValueError(f"quality must be in [1, 95] (PIL's useful range), got {quality}")
        self.quality = quality

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return jpeg_kilobytes(images, self.quality)


class JPEGCompressibility(JPEGIncompressibility):
    """Reward: minus the JPEG size in kB over 500 (smaller files score higher: flat, simple images)."""

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return -jpeg_kilobytes(images, self.quality) / 500
