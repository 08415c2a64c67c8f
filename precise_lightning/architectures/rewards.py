"""Random-weight reward models of the published classes, written in the published on-disk formats under a model
root laid out by hub id. ``size="tiny"`` for tests and CPU runs, ``size="real"`` (the published architectures)
for benchmarks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import torch
from torch import Tensor
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from precise_lightning.architectures.parts import Size
from precise_lightning.architectures.tokenizers import bert_tokenizer, clip_tokenizer

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


IMAGEREWARD, BERT = "THUDM/ImageReward", "google-bert/bert-base-uncased"


def published_random(shape: tuple[int, ...], key: str, generator: torch.Generator) -> Tensor:
    """A random tensor a trained one could be: unit-scale activations through linear layers, norms near 1."""
    if len(shape) > 1:
        fan_in = math.prod(shape[1:]) if len(shape) >= 4 else shape[-1]  # convolutions: all but the output
        return torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    if key.endswith("weight"):  # LayerNorm scale
        return 1 + 0.1 * torch.randn(shape, generator=generator)
    return 0.1 * torch.randn(shape, generator=generator)


def imagereward_shapes(size: Size, text_layers: int | None = None) -> tuple[dict[str, tuple[int, ...]], dict]:
    """Key -> shape of ``ImageReward.pt`` as the package saves it (BLIP's ViT in timm's names, BLIP's BERT text
    encoder, the contrastive projections, the MLP) and its ``med_config.json`` (as published, or tiny)."""
    from transformers import BlipTextModel

    from precise_lightning.rewards.aesthetic import aesthetic_mlp
    from precise_lightning.rewards.imagereward import text_config

    width, depth, patch, image = (1024, 24, 16, 224) if size == "real" else (64, 2, 16, 32)
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
           "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524,
           "encoder_width": 768, "add_cross_attention": True}
    if size == "tiny":
        med.update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    if text_layers is not None:
        med["num_hidden_layers"] = text_layers
    shapes = {"blip.visual_encoder.cls_token": (1, 1, width),
              "blip.visual_encoder.pos_embed": (1, (image // patch) ** 2 + 1, width),
              "blip.visual_encoder.patch_embed.proj.weight": (width, 3, patch, patch),
              "blip.visual_encoder.patch_embed.proj.bias": (width,)}
    block = {"norm1": (width,), "attn.qkv": (3 * width, width), "attn.proj": (width, width), "norm2": (width,),
             "mlp.fc1": (4 * width, width), "mlp.fc2": (width, 4 * width)}
    for i in range(depth):
        for name, shape in block.items():
            shapes[f"blip.visual_encoder.blocks.{i}.{name}.weight"] = shape
            shapes[f"blip.visual_encoder.blocks.{i}.{name}.bias"] = shape[:1]
    shapes |= {"blip.visual_encoder.norm.weight": (width,), "blip.visual_encoder.norm.bias": (width,)}
    text = BlipTextModel(text_config(med, width), add_pooling_layer=False)
    shapes |= {f"blip.text_encoder.{k}": tuple(v.shape) for k, v in text.state_dict().items()
               if "position_ids" not in k}
    hidden = med["hidden_size"]
    shapes |= {"blip.vision_proj.weight": (256, width), "blip.vision_proj.bias": (256,),
               "blip.text_proj.weight": (256, hidden), "blip.text_proj.bias": (256,)}
    shapes |= {f"mlp.{k}": tuple(v.shape) for k, v in aesthetic_mlp(hidden).state_dict().items()}  # same layout
    return shapes, med


def write_imagereward(root: Path, size: Size = "tiny", text_layers: int | None = None, seed: int = 0) -> Path:
    """``ImageReward.pt`` and ``med_config.json`` under ``root/THUDM/ImageReward`` (the same weights for the same
    arguments, whatever the global RNG) and BLIP's tokenizer under ``root/google-bert/bert-base-uncased``."""
    shapes, med = imagereward_shapes(size, text_layers)
    generator = torch.Generator().manual_seed(seed)
    state = {key: published_random(shape, key, generator) for key, shape in shapes.items()}
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]  # a buffer
    directory = root / IMAGEREWARD
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "ImageReward.pt")
    (directory / "med_config.json").write_text(json.dumps(med, indent=2))
    tokenizer = bert_tokenizer()
    tokenizer.save_pretrained(root / BERT)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    (root / BERT / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab))  # the slow tokenizer's file
    return directory
