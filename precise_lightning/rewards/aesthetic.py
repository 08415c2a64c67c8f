"""The LAION improved aesthetic predictor (github.com/christophschuhmann/improved-aesthetic-predictor): an MLP on the
unit-normalised CLIP ViT-L/14 image embedding, checkpoint ``sac+logos+ava1-l14-linearMSE.pth``; scores about 1-10."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoProcessor

from precise_lightning.hub import Dtype, WeightsNotFoundError, frozen_dtype, load_pretrained
from precise_lightning.rewards.clip import frozen_clip
from precise_lightning.rewards.preprocess import ClipPreprocess
from precise_lightning.rewards.reward import Reward

CHECKPOINT = "sac+logos+ava1-l14-linearMSE.pth"


def aesthetic_mlp(width: int = 768) -> nn.Module:
    """The predictor's head, laid out as its checkpoint's keys (``layers.0.weight``, ...); dropout is inactive."""
    head = nn.Module()
    head.layers = nn.Sequential(
        nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2), nn.Linear(128, 64),
        nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )
    return head


class AestheticScore(Reward):
    """``reward(images, prompts) -> [B]``: the aesthetic predictor's score (prompts are not used).

    Args:
        checkpoint: local path of ``sac+logos+ava1-l14-linearMSE.pth`` (the file, or a directory holding it). It
            is published in the predictor's GitHub repository, not on the hub: download it once.
        clip: hub id or local directory of the CLIP model and its processor (``openai/clip-vit-large-patch14``).
        revision: hub revision of ``clip``.
        dtype: weights' dtype: float32, as the published trainers score (scores are float32 either way).
    """

    def __init__(self, checkpoint: str, clip: str = "openai/clip-vit-large-patch14", revision: str | None = None,
                 dtype: Dtype = "float32") -> None:
        super().__init__()
        path = Path(checkpoint)
        path = path / CHECKPOINT if path.is_dir() else path
        if not path.is_file():
            raise WeightsNotFoundError(
                f"AestheticScore checkpoint {str(path)!r} (config key `checkpoint`) does not exist: download "
                f"{CHECKPOINT} from github.com/christophschuhmann/improved-aesthetic-predictor and give its path"
            )
        self.dtype = frozen_dtype(dtype)
        self.clip = frozen_clip(clip, "AestheticScore CLIP model", "clip", revision, self.dtype)
        processor = load_pretrained(AutoProcessor.from_pretrained, clip, "AestheticScore processor", "clip",
                                    revision=revision)
        self.preprocess = ClipPreprocess.from_hf(processor)
        self.mlp = aesthetic_mlp(self.clip.config.projection_dim)
        self.mlp.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.mlp.to(self.dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        embed = self.clip.get_image_features(pixel_values=self.preprocess(images).to(self.dtype)).pooler_output
        embed = nn.functional.normalize(embed.float(), dim=-1).to(self.dtype)
        return self.mlp.layers(embed).squeeze(1).float()
