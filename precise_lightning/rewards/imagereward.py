"""ImageReward (Xu et al. 2023, github.com/THUDM/ImageReward): BLIP's ViT encodes the image, BLIP's text encoder
reads the prompt with cross-attention to it, an MLP maps the [CLS] feature to a score, standardised with the
published constants; about -2 to 2, 0 the mean over the authors' human-rated images.

Built on transformers' BLIP classes with the checkpoint's keys mapped: the ``image-reward`` package pins
timm 0.6.13 and does not import with transformers 5 (THUDM/ImageReward#122). ``tests/reference/imagereward.py``
checks the scores against that package run in an environment of its own.
"""

from __future__ import annotations

import json

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor
from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from precise_lightning.hub import Dtype, frozen_dtype, hub_file, load_pretrained
from precise_lightning.rewards.aesthetic import aesthetic_mlp
from precise_lightning.rewards.base import warn_truncated_once
from precise_lightning.rewards.preprocess import ClipPreprocess
from precise_lightning.rewards.reward import Reward

REPO, CHECKPOINT, MED_CONFIG = "THUDM/ImageReward", "ImageReward.pt", "med_config.json"
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py: rewards = (rewards - mean) / std
MAX_TOKENS = 35  # ImageReward.py pads and truncates prompts to 35 tokens
_UNUSED = ("blip.vision_proj.", "blip.text_proj.")  # BLIP's contrastive projections: in the file, not in the score
_VIT = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj": "embeddings.patch_embedding", "norm1": "layer_norm1", "norm2": "layer_norm2",
        "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection", "blocks": "encoder.layers",
        "norm": "post_layernorm"}


def _vit_key(key: str) -> str:
    """BLIP's (timm's) ViT key -> transformers' ``BlipVisionModel`` key, e.g. ``blocks.3.attn.proj.weight`` ->
    ``encoder.layers.3.self_attn.projection.weight``."""
    parts = key.split(".")
    out, i = [], 0
    while i < len(parts):
        pair = ".".join(parts[i : i + 2])
        if pair in _VIT:
            out.append(_VIT[pair])
            i += 2
        else:
            out.append(_VIT.get(parts[i], parts[i]))
            i += 1
    return ".".join(out)


def split_checkpoint(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """``ImageReward.pt``'s state dict -> (``BlipVisionModel``, ``BlipTextModel``, MLP head) state dicts."""
    vision, text, head, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            vision[_vit_key(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
        elif not key.startswith(_UNUSED) and not key.endswith("position_ids"):
            unknown.append(key)
    if unknown or not (vision and text and head):
        raise ValueError(f"not an ImageReward checkpoint: unexpected keys {unknown[:5]} or a missing part "
                         f"(vision {len(vision)}, text {len(text)}, mlp {len(head)} tensors)")
    return vision, text, head


def vision_config(vision: dict[str, Tensor]) -> BlipVisionConfig:
    """BLIP's ViT as the checkpoint's shapes say (ViT-L/16 at 224 in the published file); heads of width 64."""
    width, channels, patch, _ = vision["embeddings.patch_embedding.weight"].shape
    grid = round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    depth = len({k.split(".")[2] for k in vision if k.startswith("encoder.layers.")})
    return BlipVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                            num_attention_heads=max(width // 64, 1), image_size=grid * patch, patch_size=patch,
                            num_channels=channels, layer_norm_eps=1e-6, hidden_act="gelu")


def text_config(med: dict, encoder_width: int) -> BlipTextConfig:
    """BLIP's text encoder from ``med_config.json`` (a BERT config) with cross-attention to ``encoder_width``."""
    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=med.get("pad_token_id", 0), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        is_decoder=True,  # in transformers' BLIP this builds the cross-attention; masking is set per call
    )


class ImageReward(Reward):
    """``reward(images [B, C, H, W] in [0, 1], prompts) -> [B]`` float32: the ImageReward score.

    Args:
        model: hub id or local directory holding ``ImageReward.pt`` and ``med_config.json`` (``THUDM/ImageReward``).
        tokenizer: hub id or local directory of BLIP's tokenizer, ``bert-base-uncased`` (the package adds two
            special tokens that prompts never contain, so they are not needed to score).
        revision: hub revision of ``model``.
        dtype: weights' dtype: float32, as the published trainers score (scores are float32 either way).
    """

    def __init__(self, model: str = REPO, tokenizer: str = "google-bert/bert-base-uncased",
                 revision: str | None = None, dtype: Dtype = "float32") -> None:
        super().__init__()
        checkpoint = hub_file(model, CHECKPOINT, "ImageReward checkpoint", "model", revision)
        with open(hub_file(model, MED_CONFIG, "ImageReward text-encoder config", "model", revision)) as f:
            med = json.load(f)
        vision, text, head = split_checkpoint(torch.load(checkpoint, map_location="cpu", weights_only=True))
        self.dtype = frozen_dtype(dtype)
        self.vision = BlipVisionModel(vision_config(vision))
        self.vision.load_state_dict(vision)
        self.text = BlipTextModel(text_config(med, self.vision.config.hidden_size), add_pooling_layer=False)
        self.text.load_state_dict(text)
        self.mlp = aesthetic_mlp(head["layers.0.weight"].shape[1])  # the same head layout as the aesthetic MLP
        self.mlp.load_state_dict(head)
        self.to(self.dtype).eval().requires_grad_(False)
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, tokenizer, "ImageReward tokenizer",
                                         "tokenizer")
        size = self.vision.config.image_size
        self.preprocess = ClipPreprocess(size, size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, "bicubic",
                                         crop_offset="round")  # the package's transform: OpenAI CLIP's

    def _tokens(self, prompts: list[str]) -> dict[str, Tensor]:
        counted = self.tokenizer(prompts, truncation=True, max_length=MAX_TOKENS + 1)["input_ids"]
        warn_truncated_once(self, MAX_TOKENS, [len(ids) for ids in counted], prompts)  # cut below, as published
        return self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt").to(self.mlp.layers[0].weight.device)

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        embeds = self.vision(pixel_values=self.preprocess(images).to(self.dtype)).last_hidden_state  # [B, 1+P, W]
        tokens = self._tokens(prompts)
        hidden = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                           encoder_hidden_states=embeds,
                           encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long,
                                                             device=embeds.device),
                           is_decoder=False).last_hidden_state  # bidirectional, as BLIP's "multimodal" mode
        score = self.mlp.layers(hidden[:, 0].float().to(self.dtype)).squeeze(1).float()  # [CLS] feature -> [B]
        return (score - MEAN) / STD
