"""PickScore and CLIPScore: transformers ``CLIPModel`` scorers."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import AutoProcessor, CLIPModel

from precise_lightning.hub import Dtype, load_pretrained
from precise_lightning.rewards.base import ClipReward
from precise_lightning.rewards.preprocess import ClipPreprocess


def frozen_clip(model: str, what: str, key: str, revision: str | None, dtype: torch.dtype) -> CLIPModel:
    """A transformers ``CLIPModel`` from a hub id or local path, frozen in ``dtype`` (config key ``key`` in errors)."""
    return load_pretrained(CLIPModel.from_pretrained, model, what, key, revision=revision).to(dtype).eval() \
        .requires_grad_(False)


class HFClipReward(ClipReward):
    """A transformers ``CLIPModel`` with the image preprocessing and tokenizer of ``processor``."""

    def __init__(self, model: str, processor: str | None, revision: str | None, dtype: Dtype) -> None:
        super().__init__(dtype)
        name = type(self).__name__
        self.model = frozen_clip(model, f"{name} model", "model", revision, self.dtype)
        proc = load_pretrained(AutoProcessor.from_pretrained, processor or model, f"{name} processor",
                               "processor" if processor else "model", revision=None if processor else revision)
        self.tokenizer = proc.tokenizer
        self.preprocess = ClipPreprocess.from_hf(proc)
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    def encode_images(self, pixels: Tensor) -> Tensor:
        return self.model.get_image_features(pixel_values=pixels).pooler_output  # the projected embedding

    def encode_texts(self, prompts: list[str]) -> Tensor:
        counted = self.tokenizer(prompts, truncation=True, max_length=self.max_tokens + 1)["input_ids"]
        self.warn_truncated([len(ids) for ids in counted], prompts)  # over max_tokens: truncated below
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt").to(self.model.device)
        return self.model.get_text_features(**tokens).pooler_output


class PickScore(HFClipReward):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(text, image)``, about 20-24 on good images.

    Args:
        model: hub id or local directory of the CLIP model (``yuvalkirstain/PickScore_v1``).
        processor: hub id or local directory of its processor (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
        revision: hub revision of ``model``.
        dtype: weights' dtype: float32, as the published trainers score (scores are float32 either way).
    """

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        revision: str | None = None,
        dtype: Dtype = "float32",
    ) -> None:
        super().__init__(model, processor, revision, dtype)

    def formula(self, cos: Tensor) -> Tensor:
        return self.model.logit_scale.float().exp() * cos


class CLIPScore(HFClipReward):
    """CLIPScore as torchmetrics defines it (Hessel et al. 2021): ``100 * max(cos(text, image), 0)``.

    torchmetrics' ``clip_score`` returns a batch mean and preprocesses through PIL on the CPU, so the per-image
    reward is computed here; the tests check it against torchmetrics on the same model.

    Args:
        model: hub id or local directory of the CLIP model and its processor (``openai/clip-vit-large-patch14``).
        revision: hub revision.
        dtype: weights' dtype: float32, as the published trainers score (scores are float32 either way).
    """

    def __init__(
        self, model: str = "openai/clip-vit-large-patch14", revision: str | None = None, dtype: Dtype = "float32"
    ) -> None:
        super().__init__(model, None, revision, dtype)

    def formula(self, cos: Tensor) -> Tensor:
        return 100 * cos.clamp(min=0)


class PreciseCLIPScore(CLIPScore):
    """CLIPScore as the Precise code scores it (``rewards/scorers/clip.py:39-53``): ``logit_scale.exp() * cos / 30``
    (no clamp at 0), on the float images resized bilinearly (torchvision's ``Resize`` on the tensor, antialiased),
    centre-cropped as ``CenterCrop`` rounds and normalised: no uint8 rounding. The FLUX.2 Klein recipes use it.

    Args: as :class:`CLIPScore`.
    """

    def __init__(
        self, model: str = "openai/clip-vit-large-patch14", revision: str | None = None, dtype: Dtype = "float32"
    ) -> None:
        super().__init__(model, revision, dtype)
        p = self.preprocess
        self.preprocess = ClipPreprocess(p.size, p.crop, p.mean.flatten().tolist(), p.std.flatten().tolist(),
                                         "bilinear", crop_offset="round", quantize=False)

    def formula(self, cos: Tensor) -> Tensor:
        return self.model.logit_scale.float().exp() * cos / 30
