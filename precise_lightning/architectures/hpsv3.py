"""HPSv3's files with random weights: its base model's config, processor and tokenizer as the hub holds them
(``Qwen/Qwen2-VL-7B-Instruct``), and ``HPSv3.safetensors`` in the key layout the ``hpsv3`` package saves
(transformers 4.45's ``Qwen2VLForConditionalGeneration`` plus ``rm_head``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import safetensors.torch
import torch
from transformers import Qwen2VLConfig, Qwen2VLModel

from precise_lightning.architectures.parts import Size
from precise_lightning.architectures.rewards import published_random
from precise_lightning.architectures.tokenizers import QWEN2_VL_CHAT_TEMPLATE, QWEN2_VL_SPECIALS, qwen2_vl_tokenizer

HPSV3, HPSV3_FILE, QWEN2_VL = "MizzenAI/HPSv3", "HPSv3.safetensors", "Qwen/Qwen2-VL-7B-Instruct"

# Qwen/Qwen2-VL-7B-Instruct config.json (transformers 4.41's flat layout, as the hub file is).
QWEN2_VL_7B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
# Qwen/Qwen2-VL-7B-Instruct preprocessor_config.json.
QWEN2_VL_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
}
QWEN2_VL_REGULAR_TOKENS = 151643  # the real tokenizer's ids before its special tokens
RANKNET_HEAD = {"0": (1024, None), "3": (16, 1024), "5": (2, 16)}  # rm_head index -> (out, in; None: hidden size)


def qwen2_vl_config(size: Size, text_layers: int | None = None, vision_layers: int | None = None) -> dict:
    """The base model's config.json: as published, or tiny (the tiny tokenizer's special-token ids)."""
    config = json.loads(json.dumps(QWEN2_VL_7B))
    if size == "tiny":
        ids = {t: i for i, t in enumerate(qwen2_vl_tokenizer().convert_ids_to_tokens(range(256, 270)), 256)}
        config.update(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"], rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
        config["vision_config"].update(depth=2, embed_dim=32, num_heads=4, hidden_size=64)
    if text_layers is not None:
        config["num_hidden_layers"] = config["max_window_layers"] = text_layers
    if vision_layers is not None:
        config["vision_config"]["depth"] = vision_layers
    return config


def checkpoint_shapes(config: dict, rows: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``HPSv3.safetensors`` for the base model's config.json ``config``, its embeddings resized to
    ``rows`` (the tokenizer with ``<|Reward|>`` added): transformers 4.45's names (``model.*`` the language model,
    ``visual.*``, ``lm_head``) and the ranknet head."""
    parsed = Qwen2VLConfig.from_dict(config)
    parsed.text_config.vocab_size = rows
    with torch.device("meta"):
        model = Qwen2VLModel(parsed)
    shapes = {("model." + k.removeprefix("language_model.") if k.startswith("language_model.") else k): tuple(v.shape)
              for k, v in model.state_dict().items()}
    hidden = parsed.text_config.hidden_size
    shapes["lm_head.weight"] = (rows, hidden)
    for index, (out, inp) in RANKNET_HEAD.items():
        shapes[f"rm_head.{index}.weight"], shapes[f"rm_head.{index}.bias"] = (out, inp or hidden), (out,)
    return shapes


def hpsv3_parameters() -> int:
    """Parameters the HPSv3 reward holds at real size: the checkpoint's but ``lm_head`` (never read)."""
    rows = len(QWEN2_VL_SPECIALS) + QWEN2_VL_REGULAR_TOKENS + 1  # + <|Reward|>
    return sum(math.prod(shape) for key, shape in checkpoint_shapes(QWEN2_VL_7B, rows).items() if key != "lm_head.weight")


def write_hpsv3(root: Path, size: Size = "tiny", text_layers: int | None = None, vision_layers: int | None = None,
                seed: int = 0) -> Path:
    """The base model's files under ``root/Qwen/Qwen2-VL-7B-Instruct`` (no weights: HPSv3's file holds them all)
    and ``HPSv3.safetensors`` (bfloat16, as published) under ``root/MizzenAI/HPSv3``, the same for the same
    arguments whatever the global RNG; returns the checkpoint's path."""
    base = root / QWEN2_VL
    base.mkdir(parents=True, exist_ok=True)
    config = qwen2_vl_config(size, text_layers, vision_layers)
    (base / "config.json").write_text(json.dumps(config, indent=2))
    (base / "preprocessor_config.json").write_text(json.dumps(QWEN2_VL_PREPROCESSOR, indent=2))
    (base / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}))
    tokenizer = qwen2_vl_tokenizer()
    tokenizer.save_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    state = {key: published_random(shape, key, generator).to(torch.bfloat16)
             for key, shape in checkpoint_shapes(config, len(tokenizer) + 1).items()}
    path = root / HPSV3 / HPSV3_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, path, metadata={"format": "pt"})  # what transformers 4.45 asks of a file
    return path
