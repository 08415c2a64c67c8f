"""HPSv2.1 (Wu et al. 2023) with open_clip_torch.

Not the ``hpsv2`` package: it pins pytest==7.2.0 and protobuf<4 (which break this environment) and its wheel
lacks its tokenizer vocabulary. HPSv2.1 is an open_clip ViT-H-14 whose whole state dict is the checkpoint, so
open_clip alone reproduces it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import open_clip
from torch import Tensor

from precise_lightning.hub import Dtype, hub_file
from precise_lightning.rewards.base import ClipReward
from precise_lightning.rewards.preprocess import ClipPreprocess


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def open_clip_architecture(architecture: str | None, checkpoint: Path) -> str:
    """The open_clip model to build: as given, else the checkpoint directory's ``open_clip_config.json`` (open_clip's
    own hub format; the tiny models carry one), else ViT-H-14 (HPSv2's)."""
    if architecture is None:
        local = checkpoint.parent / "open_clip_config.json"
        return f"local-dir:{checkpoint.parent}" if local.is_file() else "ViT-H-14"
    if ":" not in architecture and architecture not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {architecture!r} (config key `architecture`): use a name "
                         "from open_clip.list_models() such as 'ViT-H-14', or 'local-dir:DIR' with open_clip_config.json")
    return architecture


class HPSv2(ClipReward):
    """HPSv2.1: cosine of the normalised image and text embeddings, about 0.25-0.35 on good images.

    Args:
        checkpoint: hub repository id holding ``filename`` (``xswu/HPSv2``), a local directory holding it, or the
            ``.pt`` file itself.
        filename: the checkpoint's file name (``HPS_v2.1_compressed.pt``; ``HPS_v2_compressed.pt`` for HPSv2.0).
        architecture: open_clip model name or ``local-dir:DIR``; default: the checkpoint directory's
            ``open_clip_config.json`` if it has one, else ``ViT-H-14``.
        revision: hub revision of ``checkpoint``.
        dtype: weights' dtype: float32, as the published trainers score (scores are float32 either way).
    """

    def __init__(
        self,
        checkpoint: str = "xswu/HPSv2",
        filename: str = "HPS_v2.1_compressed.pt",
        architecture: str | None = None,
        revision: str | None = None,
        dtype: Dtype = "float32",
    ) -> None:
        super().__init__(dtype)
        path = hub_file(checkpoint, filename, "HPSv2 checkpoint", "checkpoint", revision)
        name = open_clip_architecture(architecture, Path(path))
        with _quiet_root_logger():  # open_clip warns "initialized randomly": the checkpoint is loaded next
            self.model = open_clip.create_model(name, load_weights=False, output_dict=True)
        open_clip.load_checkpoint(self.model, path)  # strict: every weight comes from the checkpoint
        self.model.to(self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.max_tokens = self.tokenizer.context_length
        self.preprocess = ClipPreprocess.from_open_clip(self.model.visual.preprocess_cfg)

    def encode_images(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    def encode_texts(self, prompts: list[str]) -> Tensor:
        self.warn_truncated([len(self.tokenizer.encode(p)) + 2 for p in prompts], prompts)  # + start / end tokens
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(prompts).to(device))

    def formula(self, cos: Tensor) -> Tensor:
        return cos
