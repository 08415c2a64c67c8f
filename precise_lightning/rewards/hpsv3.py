"""HPSv3 (Ma et al. 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score", github.com/MizzenAI/HPSv3):
Qwen2-VL-7B-Instruct reads the image and an instruction holding the prompt; an MLP on the last hidden state of a
``<|Reward|>`` token predicts a score's mean and spread, and the mean is the reward (not standardised; DanceGRPO's
``--use_hpsv3`` trains on it, ``fastvideo/train_grpo_flux_lora.py:339-344``).

Built on transformers' Qwen2-VL classes with the checkpoint's keys mapped: the ``hpsv3`` package (1.0.0) pins
transformers 4.45.2. ``tests/reference/hpsv3_package.py`` checks the scores against that package run in an
environment of its own. The steps, as ``hpsv3/inference.py`` takes them (``HPSv3RewardInferencer``):
images resized to exactly 256 x 28 x 28 pixels (``prepare_batch``: min = max pixels, ``smart_resize``, bicubic),
the chat template with the instruction, right padding, and the language model run with plain sequential positions:
its ``Qwen2VLRewardModelBT.forward`` calls the text model without ``position_ids`` (transformers 4.45.2
``modeling_qwen2_vl.py:1204-1205``), not Qwen2-VL's 3-D image positions.
"""

from __future__ import annotations

import math

import safetensors.torch
import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F
from transformers import AutoConfig, AutoProcessor, Qwen2VLModel

from precise_lightning.hub import Dtype, frozen_dtype, hub_file, load_pretrained
from precise_lightning.rewards.preprocess import to_uint8
from precise_lightning.rewards.reward import Reward

REPO, CHECKPOINT, BASE = "MizzenAI/HPSv3", "HPSv3.safetensors", "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28  # inference.py prepare_batch: min_pixels = max_pixels
FACTOR = 28  # the vision tower's patch (14) times its 2 x 2 merge
# hpsv3/dataset/data_collator_qwen.py INSTRUCTION and prompt_with_special_token, to the character: the model was
# trained on them.
INSTRUCTION = (
    '\n'
    'You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give'
    ' a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 '
    'being the worst and 10 being the best. \n'
    '\n'
    '**Visual Quality:**  \n'
    'Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:'
    '\n'
    '- **Reasonableness:** The image should not contain any significant biological or logical errors, '
    'such as abnormal body structures or nonsensical environmental setups.\n'
    '- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and '
    'easy to interpret, with no blurring or indistinct areas.\n'
    '- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other '
    'visual elements (e.g., hair, clothing, shadows).\n'
    '- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color '
    'scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should '
    'convey a sense of harmony and balance.\n'
    '- **Safety:** The image should not contain harmful or inappropriate content, such as political, '
    'violent, or adult material. If such content is present, the image quality and satisfaction score '
    'should be the lowest possible. \n'
    '\n'
    '**Text Alignment:**  \n'
    'Assess how well the image matches the textual prompt across the following sub-dimensions:\n'
    '- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, '
    'object) align with the textual description. The subject should match the description in terms of '
    'number, appearance, and behavior.\n'
    '- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate '
    'how well the image adheres to this style.\n'
    '- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in '
    'the image logically fit the scenario described in the prompt. The environment should support and '
    'enhance the subject without contradictions.\n'
    '- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, '
    'clothing, accessories, expressions, actions) are faithfully represented in the image. Minor '
    'deviations may be acceptable, but critical attributes should be preserved.\n'
    '- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured'
    ' in the image. The generated content should not introduce elements that conflict with or distort the'
    ' original description.\n'
    'Textual prompt - {text_prompt}\n'
    '\n'
    '\n'
)


REWARD_PROMPT = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def smart_resize(height: int, width: int, pixels: int = PIXELS, factor: int = FACTOR) -> tuple[int, int]:
    """Qwen2-VL's ``smart_resize`` (``hpsv3/dataset/utils.py:55-81``) with min = max pixels: sides multiples of
    ``factor``, about ``pixels`` in all, the aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"HPSv3 cannot read an image of aspect ratio over 200, got {height} x {width}")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > pixels:
        beta = math.sqrt(height * width / pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < pixels:
        beta = math.sqrt(pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def ranknet_head(hidden: int) -> nn.Sequential:
    """``Qwen2VLRewardModelBT``'s ``rm_head`` for ``rm_head_type: ranknet`` without ``rm_head_kwargs`` (its
    indices are the checkpoint's keys; the dropout is inert when scoring)."""
    return nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))


def split_checkpoint(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``HPSv3.safetensors`` (transformers 4.45's ``Qwen2VLForConditionalGeneration`` names plus ``rm_head``) ->
    (``Qwen2VLModel`` state dict of today's transformers, ranknet head state dict). ``lm_head`` is dropped: the
    score never reads it."""
    model, head, unknown = {}, {}, []
    for key, value in state.items():
        if key.startswith("model."):
            model["language_model." + key.removeprefix("model.")] = value
        elif key.startswith("visual."):
            model[key] = value
        elif key.startswith("rm_head."):
            head[key.removeprefix("rm_head.")] = value
        elif key != "lm_head.weight":
            unknown.append(key)
    if unknown or not (model and head):
        raise ValueError(f"not an HPSv3 checkpoint: unexpected keys {unknown[:5]} or a missing part "
                         f"(Qwen2-VL {len(model)}, rm_head {len(head)} tensors)")
    return model, head


class HPSv3(Reward):
    """``reward(images [B, C, H, W] in [0, 1], prompts) -> [B]`` float32: HPSv3's predicted mean preference.

    Args:
        checkpoint: hub repository id holding ``HPSv3.safetensors`` (``MizzenAI/HPSv3``), a local directory
            holding it, or the file itself.
        base: hub id or local directory of the base model whose config, processor and chat template HPSv3 was
            trained with (``Qwen/Qwen2-VL-7B-Instruct``; its weights are not read: the checkpoint holds them all).
        revision: hub revision of ``checkpoint``.
        dtype: weights' dtype (the head is float32 either way, as published): default bfloat16 on a GPU, as
            HPSv3's inference config (``bf16: True``), float32 on a CPU.
    """

    def __init__(self, checkpoint: str = REPO, base: str = BASE, revision: str | None = None,
                 dtype: Dtype | None = None) -> None:
        super().__init__()
        path = hub_file(checkpoint, CHECKPOINT, "HPSv3 checkpoint", "checkpoint", revision)
        weights, head = split_checkpoint(safetensors.torch.load_file(path))
        self.processor = load_pretrained(AutoProcessor.from_pretrained, base, "HPSv3 base model's processor",
                                         "base", padding_side="right")
        tokenizer = self.processor.tokenizer
        tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})  # as the package loads it
        self.reward_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        rows = weights["language_model.embed_tokens.weight"].shape[0]
        if len(tokenizer) != rows:
            raise ValueError(f"HPSv3's checkpoint {path} has {rows} token embeddings but the tokenizer of base "
                             f"{base!r} has {len(tokenizer)} with {REWARD_TOKEN} added: set `base` to the model "
                             "HPSv3 was trained from (Qwen/Qwen2-VL-7B-Instruct)")
        config = load_pretrained(AutoConfig.from_pretrained, base, "HPSv3 base model's config", "base")
        config.text_config.vocab_size = rows  # the package's resize_token_embeddings, before its load
        self.dtype = frozen_dtype(dtype)  # None: bfloat16 on a GPU, float32 on a CPU
        self.model = Qwen2VLModel.from_pretrained(None, config=config, state_dict=weights, dtype=self.dtype)
        self.head = ranknet_head(config.text_config.hidden_size)
        self.head.load_state_dict(head)
        self.head.float()
        self.eval().requires_grad_(False)

    def texts(self, prompts: list[str]) -> list[str]:
        """The chat-template text of each prompt, its image as the template's placeholder."""
        messages = [[{"role": "user", "content": [{"type": "image"},
                                                  {"type": "text", "text": INSTRUCTION.format(text_prompt=p)
                                                   + REWARD_PROMPT}]}] for p in prompts]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [B, 1 or 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        pixels = to_uint8(images).expand(-1, 3, -1, -1)  # the package reads PIL images: uint8 RGB
        size = list(smart_resize(*pixels.shape[-2:]))
        pixels = F.resize(pixels, size, interpolation=InterpolationMode.BICUBIC, antialias=True)  # PIL's bicubic
        device = self.head[0].weight.device
        pixels = pixels.cpu()  # the processor cuts patches on the CPU (uint8 images: a small copy)
        batch = self.processor(text=self.texts(prompts), images=list(pixels), padding=True, return_tensors="pt")
        batch = batch.to(device)
        ids = batch["input_ids"]  # [B, L]
        marks = ids == self.reward_id
        if not bool((marks.sum(1) == 1).all()):
            bad = prompts[int((marks.sum(1) != 1).nonzero()[0])]
            raise ValueError(f"every HPSv3 input must hold {REWARD_TOKEN} once, after the prompt; this prompt "
                             f"contains it: {bad[:200]!r}")
        positions = torch.arange(ids.shape[1], device=device).view(1, 1, -1).expand(3, *ids.shape)  # see above
        hidden = self.model(input_ids=ids, attention_mask=batch["attention_mask"], position_ids=positions,
                            pixel_values=batch["pixel_values"].to(self.dtype),
                            image_grid_thw=batch["image_grid_thw"]).last_hidden_state  # [B, L, D]
        return self.head(hidden[marks].float())[:, 0]  # [B]: the mean; column 1 is the spread
