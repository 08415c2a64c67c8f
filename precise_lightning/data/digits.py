"""The built-in demo's data: scikit-learn's 8x8 handwritten digits (shipped with the package, no download)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_DIGIT = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.IGNORECASE)


def parse_digit(prompt: str) -> int:
    """The digit a prompt asks for ("a handwritten digit 7", "the number seven"); exactly one must be named."""
    found = {m if m.isdigit() else str(DIGIT_WORDS.index(m.lower())) for m in _DIGIT.findall(prompt)}
    if len(found) != 1:
        raise ValueError(f"digit prompts must name exactly one digit (0-9 or zero-nine), got {prompt!r}")
    return int(found.pop())


def digit_labels(prompts: list[str], device: torch.device | str = "cpu") -> Tensor:
    return torch.tensor([parse_digit(p) for p in prompts], dtype=torch.long, device=device)


def load_digits() -> tuple[Tensor, Tensor]:
    """All 1797 images as [N, 1, 8, 8] floats in [0, 1] and their labels [N]."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target, dtype=torch.long)


def cache_dir(path: str | None) -> Path:
    return Path(path or os.environ.get("PRECISE_LIGHTNING_CACHE", "~/.cache/precise_lightning")).expanduser()


@contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG inside the block and restore it after: a cache hit or miss leaves training alike."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def cached_state_dict(directory: str | None, name: str, config: dict, train: Callable[[], dict]) -> dict:
    """Load a state dict cached under a hash of ``config``, or train it once and save it atomically."""
    key = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir(directory) / f"{name}-{key}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    state = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written file
    return state
