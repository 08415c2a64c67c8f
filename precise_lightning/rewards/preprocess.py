"""CLIP image preprocessing on tensors, batched and on the images' device: the published processors' resize,
centre crop and normalisation, without a round trip through PIL on the CPU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
_PIL_RESAMPLE = {3: "bicubic", 2: "bilinear"}  # PIL's codes, as transformers' image processors store them


def to_uint8(images: Tensor) -> Tensor:
    """images [B, C, H, W] in [0, 1] -> uint8, rounded as the published reward code rounds them (it hands PIL
    images to its scorers)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


class ClipPreprocess(nn.Module):
    """images [B, C, H, W] in [0, 1] (C = 1 or 3) -> normalised pixels [B, 3, crop, crop] float32.

    As the published reward code does it: images rounded to uint8 (it hands PIL images to the processor), the
    shortest side resized to ``size`` in uint8 (torchvision's antialiased uint8 resize is a port of PIL's filters),
    centre crop, ``x / 255``, then ``(x - mean) / std``. ``crop_offset`` is how the crop's corner is rounded:
    ``floor`` in transformers' processors, ``round`` in torchvision's ``CenterCrop`` (open_clip); the two differ by
    a pixel when the margin is odd. ``quantize=False`` keeps the images float (no uint8 rounding): the Precise
    code's CLIPScore resizes the float tensor (``rewards/scorers/clip.py:20-44``).
    """

    def __init__(
        self,
        size: int,
        crop: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        crop_offset: str = "floor",
        quantize: bool = True,
    ) -> None:
        super().__init__()
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
        if crop_offset not in ("floor", "round"):
            raise ValueError(f"crop_offset must be 'floor' or 'round', got {crop_offset!r}")
        if crop > size:
            raise ValueError(f"crop ({crop}) must not exceed the resized shortest side ({size})")
        self.size, self.crop, self.crop_offset, self.quantize = size, crop, crop_offset, quantize
        self.interpolation = _INTERPOLATION[interpolation]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_hf(cls, processor) -> ClipPreprocess:
        """From a transformers ``CLIPImageProcessor`` (or a processor holding one as ``image_processor``)."""
        p = getattr(processor, "image_processor", processor)
        size, crop = dict(p.size), dict(p.crop_size)
        if "shortest_edge" not in size or not (p.do_resize and p.do_center_crop and p.do_normalize):
            raise ValueError(f"unsupported image processor settings (need shortest-edge resize + crop): {p}")
        if crop["height"] != crop["width"]:
            raise ValueError(f"unsupported non-square crop {crop}")
        resample = _PIL_RESAMPLE.get(int(p.resample))
        if resample is None:
            raise ValueError(f"unsupported resample filter {p.resample} (bicubic or bilinear)")
        return cls(size["shortest_edge"], crop["height"], p.image_mean, p.image_std, resample, crop_offset="floor")

    @classmethod
    def from_open_clip(cls, cfg: dict) -> ClipPreprocess:
        """From an open_clip model's ``visual.preprocess_cfg`` (what its ``preprocess_val`` is built from)."""
        size = cfg["size"]
        size = size if isinstance(size, int) else size[0]
        if cfg.get("resize_mode", "shortest") != "shortest":
            raise ValueError(f"unsupported open_clip resize_mode {cfg['resize_mode']!r} (only 'shortest')")
        return cls(size, size, cfg["mean"], cfg["std"], cfg.get("interpolation", "bicubic"), crop_offset="round")

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [B, 1 or 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        x = to_uint8(images) if self.quantize else images.detach().float()
        x = x.expand(-1, 3, -1, -1)  # grey -> RGB, as the processors' convert("RGB") does
        x = F.resize(x, [self.size], interpolation=self.interpolation, antialias=True)
        h, w = x.shape[-2:]
        if self.crop_offset == "round":
            x = F.center_crop(x, [self.crop, self.crop])
        else:
            top, left = (h - self.crop) // 2, (w - self.crop) // 2
            x = x[..., top : top + self.crop, left : left + self.crop]
        x = x.float() / 255 if self.quantize else x
        return (x - self.mean) / self.std
