"""What PickScore, HPSv2.1 and CLIPScore share: CLIP image and text embeddings, their cosine, one formula."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from precise_lightning.hub import Dtype, frozen_dtype
from precise_lightning.rewards.preprocess import ClipPreprocess
from precise_lightning.rewards.reward import Reward

log = logging.getLogger(__name__)


class ClipReward(Reward):
    """``forward(images [B, C, H, W] in [0, 1], prompts) -> [B] float32``, no grad, on the images' device.

    Subclasses set ``preprocess`` and ``max_tokens`` and implement :meth:`encode_images`, :meth:`encode_texts`
    and :meth:`formula`. Each distinct prompt is encoded once per call (a GRPO batch repeats every prompt
    group-size times).
    """

    preprocess: ClipPreprocess
    max_tokens: int

    def __init__(self, dtype: Dtype = "float32") -> None:
        super().__init__()
        self.dtype = frozen_dtype(dtype)

    def encode_images(self, pixels: Tensor) -> Tensor:
        """Image embeddings [B, D] of normalised pixels [B, 3, S, S]."""
        raise NotImplementedError

    def encode_texts(self, prompts: list[str]) -> Tensor:
        """Text embeddings [P, D], prompts truncated to ``max_tokens`` (see :meth:`warn_truncated`)."""
        raise NotImplementedError

    def formula(self, cos: Tensor) -> Tensor:
        """The published metric of the cosine similarity [B] (float32)."""
        raise NotImplementedError

    def warn_truncated(self, token_counts: list[int], prompts: list[str]) -> None:
        warn_truncated_once(self, self.max_tokens, token_counts, prompts)

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        pixels = self.preprocess(images).to(self.dtype)
        image = nn.functional.normalize(self.encode_images(pixels).float(), dim=-1)
        position = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        text = nn.functional.normalize(self.encode_texts(list(position)).float(), dim=-1)
        index = torch.tensor([position[p] for p in prompts], device=text.device)
        return self.formula((image * text[index]).sum(-1))


def warn_truncated_once(scorer: nn.Module, max_tokens: int, token_counts: list[int], prompts: list[str]) -> None:
    """Warn once per scorer that prompts over its text encoder's limit were cut (as every published scorer does)."""
    long = [p for n, p in zip(token_counts, prompts) if n > max_tokens]
    if long and not getattr(scorer, "_warned_truncation", False):
        scorer._warned_truncation = True
        log.warning("%s: %d prompt(s) exceed the text encoder's %d tokens and are truncated, e.g. %r (warned once)",
                    type(scorer).__name__, len(long), max_tokens, long[0][:120])
