"""Random-weight reward models of the published classes, written in the published on-disk formats under a model
root laid out by hub id. ``size="tiny"`` for tests and CPU runs, ``size="real"`` (the published architectures)
for benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import open_clip
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from precise_lightning.tiny.tokenizers import clip_tokenizer

Size = Literal["tiny", "real"]
PICKSCORE, PICKSCORE_PROCESSOR = "yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIPSCORE, HPSV2, HPSV2_FILE = "openai/clip-vit-large-patch14", "xswu/HPSv2", "HPS_v2.1_compressed.pt"


def _tower(hidden: int, layers: int, heads: int, act: str, **extra) -> dict:
    return dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, hidden_act=act, **extra)


def clip_config(name: str, size: Size) -> CLIPConfig:
    """PickScore (OpenCLIP ViT-H/14, GELU) or CLIPScore's OpenAI ViT-L/14 (quick GELU), real or tiny."""
    act = "quick_gelu" if name == CLIPSCORE else "gelu"
    if size == "tiny":
        text, vision, dim, image, patch = _tower(32, 2, 4, act), _tower(32, 2, 4, act), 16, 32, 8
    elif name == CLIPSCORE:
        text, vision, dim, image, patch = _tower(768, 12, 12, act), _tower(1024, 24, 16, act), 768, 224, 14
    else:
        text, vision, dim, image, patch = _tower(1024, 24, 16, act), _tower(1280, 32, 16, act), 1024, 224, 14
    return CLIPConfig(
        text_config=dict(text, vocab_size=49408, max_position_embeddings=77, projection_dim=dim),
        vision_config=dict(vision, image_size=image, patch_size=patch, projection_dim=dim),
        projection_dim=dim,
    )


def _processor(config: CLIPConfig, pad_token: str) -> CLIPProcessor:
    size = config.vision_config.image_size
    image = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return CLIPProcessor(image_processor=image, tokenizer=clip_tokenizer(pad_token=pad_token))


def write_clip_rewards(root: Path, size: Size = "tiny") -> None:
    """PickScore (model and the LAION processor, two repos) and CLIPScore (model and processor, one repo)."""
    for name, processor_repo, pad in [(PICKSCORE, PICKSCORE_PROCESSOR, "!"), (CLIPSCORE, CLIPSCORE, "<|endoftext|>")]:
        config = clip_config(name, size)
        CLIPModel(config).save_pretrained(root / name)
        _processor(config, pad).save_pretrained(root / processor_repo)


def hpsv2_config(size: Size) -> dict:
    if size == "real":
        return open_clip.get_model_config("ViT-H-14")
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    }


def write_hpsv2(root: Path, size: Size = "tiny") -> None:
    """``HPS_v2.1_compressed.pt`` ({"state_dict": ...}, as HPSv2 ships it) and, for the tiny model, its architecture
    as ``open_clip_config.json`` (open_clip's hub format; the real repository has none: it is ViT-H-14)."""
    directory = root / HPSV2
    directory.mkdir(parents=True, exist_ok=True)
    config = hpsv2_config(size)
    model = open_clip.CLIP(**config)
    torch.save({"state_dict": model.state_dict()}, directory / HPSV2_FILE)
    if size == "tiny":
        (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}, indent=2))


AESTHETIC_DIR = "improved-aesthetic-predictor"  # not a hub repository: the predictor ships on GitHub


def write_aesthetic(root: Path, size: Size = "tiny") -> Path:
    """The aesthetic predictor's head as its checkpoint file, sized to the CLIPScore model's embedding (which the
    predictor reads: ViT-L/14, 768 at real size), under ``root/improved-aesthetic-predictor/``; returns the file."""
    from precise_lightning.rewards.aesthetic import CHECKPOINT, aesthetic_mlp

    path = root / AESTHETIC_DIR / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(aesthetic_mlp(clip_config(CLIPSCORE, size).projection_dim).state_dict(), path)
    return path
