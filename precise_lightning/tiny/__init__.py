"""Tiny random-weight models of the published classes, for tests and CPU runs without a download.

``python -m precise_lightning.tiny DIR`` writes them under ``DIR`` laid out by hub id
(``DIR/yuvalkirstain/PickScore_v1``, ``DIR/stabilityai/stable-diffusion-3.5-medium``, ...): every base model a policy
names (:func:`precise_lightning.policies.pipeline_policies`, each built by its policy's ``build``) and every reward
model. ``model_root: DIR`` (``configs/tiny_cpu.yaml``) makes the real configs load them through the same loading
code as the real weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from precise_lightning.architectures.hpsv3 import write_hpsv3
from precise_lightning.architectures.parts import Size
from precise_lightning.architectures.rewards import write_aesthetic, write_clip_rewards, write_hpsv2, write_imagereward
from precise_lightning.policies import pipeline_policies


def write_models(root: Path, size: Size = "tiny", depth: int | None = None) -> None:
    """Every registered base model's pipeline under ``root / hub_id``."""
    for policy in pipeline_policies():
        policy.build(size, depth).save_pretrained(root / policy.hub_id)


def write_tiny(root: str | Path, seed: int = 0) -> Path:
    """Write every tiny model under ``root`` (the same weights for the same seed); returns it."""
    root = Path(root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        write_clip_rewards(root, "tiny")
        write_hpsv2(root, "tiny")
        write_models(root)
        write_aesthetic(root, "tiny")  # last: the others' random weights stay as they were
        write_imagereward(root, "tiny")  # its own generator
        write_hpsv3(root, "tiny")  # its own generator
    return root
