"""Tensor preprocessing against the published processors (PIL-based and torchvision-based), same images.

Tolerance: values are compared in uint8 levels (pixel * std * 255). At least 99% of values are identical and none
differs by more than 2 levels; the residue is the rounding inside PIL's separable filters.
"""

import open_clip
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from precise_lightning.rewards import ClipPreprocess

# square, the two orientations of 2:3, odd sizes, margins whose half is x.5 (floor and round differ at 231), tiny
SIZES = [(512, 512), (512, 768), (768, 512), (101, 333), (224, 231), (231, 224), (8, 8)]


def _images(h: int, w: int, channels: int = 3, n: int = 3) -> torch.Tensor:
    """uint8 [n, C, h, w]: smooth content plus fine noise."""
    g = torch.Generator().manual_seed(h * 1000 + w)
    smooth = torch.nn.functional.interpolate(torch.rand(n, channels, 6, 6, generator=g), size=(h, w), mode="bicubic")
    return ((smooth + 0.15 * torch.randn(n, channels, h, w, generator=g)).clamp(0, 1) * 255).round().to(torch.uint8)


def _pil(u8: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(i.permute(1, 2, 0).squeeze(-1).numpy()) for i in u8]


def _assert_agrees(ours: torch.Tensor, ref: torch.Tensor, std: list[float]) -> None:
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    levels = ((ours - ref) * torch.tensor(std).view(1, 3, 1, 1) * 255).abs()
    assert levels.max() <= 2 + 1e-3, levels.max()
    assert (levels < 1e-3).float().mean() >= 0.99, (levels < 1e-3).float().mean()


def _open_clip_cfg() -> dict:
    """HPSv2's preprocessing: open_clip's ViT-H-14 with the laion2B-s32B-b79K tag's settings."""
    tag = open_clip.get_pretrained_cfg("ViT-H-14", "laion2B-s32B-b79K")
    mean, std = tag.get("mean") or open_clip.OPENAI_DATASET_MEAN, tag.get("std") or open_clip.OPENAI_DATASET_STD
    return dict(size=224, mean=mean, std=std, interpolation=tag.get("interpolation", "bicubic"),
                resize_mode=tag.get("resize_mode", "shortest"))


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("processor_cls", [CLIPImageProcessorPil, CLIPImageProcessor], ids=["pil", "torchvision"])
def test_matches_transformers_clip_processor(size, processor_cls):
    processor = processor_cls()  # CLIP's published settings: shortest side 224, bicubic, crop 224, OpenAI stats
    u8 = _images(*size)
    ref = processor(images=_pil(u8), return_tensors="pt")["pixel_values"]
    _assert_agrees(ClipPreprocess.from_hf(processor)(u8.float() / 255), ref, processor.image_std)


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_matches_open_clip_preprocess(size):
    cfg = _open_clip_cfg()
    transform = open_clip.image_transform(224, is_train=False, mean=cfg["mean"], std=cfg["std"],
                                          interpolation=cfg["interpolation"], resize_mode=cfg["resize_mode"])
    u8 = _images(*size)
    ref = torch.stack([transform(image) for image in _pil(u8)])
    _assert_agrees(ClipPreprocess.from_open_clip(cfg)(u8.float() / 255), ref, cfg["std"])


def test_grey_images_become_rgb_as_the_processor_converts_them():
    processor = CLIPImageProcessorPil()
    u8 = _images(64, 48, channels=1)
    ref = processor(images=_pil(u8), return_tensors="pt")["pixel_values"]
    _assert_agrees(ClipPreprocess.from_hf(processor)(u8.float() / 255), ref, processor.image_std)


def test_crop_offsets_differ_where_the_libraries_do():
    """transformers floors the crop corner, torchvision rounds: with a 7-pixel margin they differ by one column."""
    x = torch.rand(1, 3, 224, 231)
    floor = ClipPreprocess(224, 224, [0.0] * 3, [1.0] * 3, crop_offset="floor")(x)
    rounded = ClipPreprocess(224, 224, [0.0] * 3, [1.0] * 3, crop_offset="round")(x)
    torch.testing.assert_close(floor[..., 1:], rounded[..., :-1])
    assert not torch.equal(floor, rounded)


def test_values_outside_unit_range_are_clamped_like_uint8_conversion():
    x = torch.rand(2, 3, 40, 40) * 1.4 - 0.2
    pre = ClipPreprocess(32, 32, [0.0] * 3, [1.0] * 3)
    torch.testing.assert_close(pre(x), pre(x.clamp(0, 1)))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(interpolation="lanczos"), "interpolation must be one of"),
        (dict(crop_offset="ceil"), "crop_offset must be"),
        (dict(crop=300), r"crop \(300\) must not exceed"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    args = dict(size=224, crop=224, mean=[0.5] * 3, std=[0.5] * 3) | kwargs
    with pytest.raises(ValueError, match=message):
        ClipPreprocess(**args)


def test_bad_image_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"images must be \[B, 1 or 3, H, W\]"):
        ClipPreprocess(32, 32, [0.5] * 3, [0.5] * 3)(torch.rand(2, 4, 32, 32))
