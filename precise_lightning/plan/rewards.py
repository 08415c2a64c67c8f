"""Reward models' weights for a plan: counted on the loaded model when its weights are on this machine (servers such
as GenEval's and VLM judges' load none), else on the published architecture built on the meta device."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import open_clip
import torch
from jsonargparse.typing import import_object
from torch import nn
from transformers import CLIPModel

from precise_lightning.architectures.hpsv3 import hpsv3_parameters
from precise_lightning.architectures.rewards import CLIPSCORE, PICKSCORE, clip_config, hpsv2_config, imagereward_shapes
from precise_lightning.hub import WeightsNotFoundError, frozen_dtype
from precise_lightning.rewards import AestheticScore, CLIPScore, HPSv2, HPSv3, ImageReward, PickScore
from precise_lightning.rewards.aesthetic import aesthetic_mlp


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# The published architectures (the same builders as the tiny ones, at size "real"), parameter counts on meta.
PUBLISHED: dict[type, Callable[[], int]] = {
    PickScore: lambda: _count(CLIPModel(clip_config(PICKSCORE, "real"))),
    CLIPScore: lambda: _count(CLIPModel(clip_config(CLIPSCORE, "real"))),
    HPSv2: lambda: _count(open_clip.CLIP(**hpsv2_config("real"))),
    ImageReward: lambda: sum(math.prod(s) for k, s in imagereward_shapes("real")[0].items()),
    HPSv3: hpsv3_parameters,
    AestheticScore: lambda: _count(CLIPModel(clip_config(CLIPSCORE, "real"))) + _count(aesthetic_mlp(768)),
}


def reward_parameters(spec: Any) -> tuple[int, int]:
    """(parameters, bytes on the GPU) of the reward a config section names (``class_path`` / ``init_args``)."""
    cls = import_object(spec.class_path)
    init = dict(vars(spec.init_args)) if getattr(spec, "init_args", None) is not None else {}
    try:
        model = cls(**init)
    except WeightsNotFoundError:
        published = next((PUBLISHED[c] for c in cls.__mro__ if c in PUBLISHED), None)  # a variant: its base's model
        if published is None:
            raise
        with torch.device("meta"):
            count = published()
        default = inspect.signature(cls).parameters.get("dtype")
        dtype = init.get("dtype", default.default if default is not None else "float32")
        return count, count * (frozen_dtype(dtype).itemsize if dtype is not None else 2)  # None: bfloat16 on a GPU
    count = sum(p.numel() for p in model.parameters())
    return count, sum(p.numel() * p.element_size() for p in model.parameters())
