"""One loading path for pretrained parts (reward models now, base models next): a hub id or a local path, and one
clear error when the weights are not there.

A *model root* (``model_root`` in the config, or :func:`set_model_root`) is a local directory laid out by hub id
(``ROOT/yuvalkirstain/PickScore_v1``): a name found under it loads from there, anything else from the hub. It
serves clusters that mirror weights to a shared disk, and the tiny CPU models (``python -m precise_lightning.tiny``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

import torch
from huggingface_hub import hf_hub_download

T = TypeVar("T")
Dtype = Literal["float32", "bfloat16", "float16"]

_model_root: Path | None = None


def set_model_root(root: str | None) -> None:
    """Look hub ids up under ``root`` first (None: hub ids go to the hub)."""
    global _model_root
    if root is not None and not Path(root).expanduser().is_dir():
        raise FileNotFoundError(f"model_root {root!r} is not a directory: create it (e.g. `python -m "
                                f"precise_lightning.tiny {root}` for the tiny models) or set model_root to null")
    _model_root = Path(root).expanduser() if root is not None else None


def resolve(name_or_path: str) -> str:
    """A local path as given, else the model root's copy of a hub id if it has one, else the hub id."""
    if Path(name_or_path).expanduser().exists() or _model_root is None:
        return name_or_path
    mirrored = _model_root / name_or_path
    return str(mirrored) if mirrored.exists() else name_or_path


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for that are neither a local path nor reachable on the hub."""


def _missing(what: str, name: str, key: str, cause: BaseException, filename: str | None = None) -> WeightsNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    target = f"{name}/{filename}" if filename else name
    root = f" nor under model_root {str(_model_root)!r}" if _model_root is not None else ""
    download = f"hf download {name}" + (f" {filename}" if filename else "")
    return WeightsNotFoundError(
        f"could not load the {what} from {target!r} (config key `{key}`): no local path of that name{root}, and the hub "
        f"{'is off (HF_HUB_OFFLINE=1)' if offline else 'could not supply it'}. Either download it where there is a "
        f"network (`{download}`, or `hf download {name} --local-dir DIR`) and set `{key}` to that local path, or "
        f"{'unset HF_HUB_OFFLINE' if offline else 'check the id and your network / HF token'}. "
        f"Cause: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}"
    )


def load_pretrained(load: Callable[..., T], name_or_path: str, what: str, key: str, **kwargs) -> T:
    """``load(name_or_path, **kwargs)`` (a ``from_pretrained``), re-raising a missing source as one clear error."""
    try:
        return load(resolve(name_or_path), **kwargs)
    except OSError as err:
        raise _missing(what, name_or_path, key, err) from err


def hub_file(repo_or_path: str, filename: str, what: str, key: str, revision: str | None = None) -> str:
    """A single weights file: ``repo_or_path`` is a local file, a local directory holding ``filename``, or a hub
    repository id holding it. Returns a local path."""
    path = Path(resolve(repo_or_path)).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        if (path / filename).is_file():
            return str(path / filename)
        raise WeightsNotFoundError(f"the {what}: directory {str(path)!r} has no {filename!r} (config key `{key}`)")
    try:
        return hf_hub_download(repo_or_path, filename, revision=revision)
    except (OSError, ValueError) as err:  # ValueError: not a valid repo id (a mistyped path)
        raise _missing(what, repo_or_path, key, err, filename) from err


def frozen_dtype(name: Dtype | None) -> torch.dtype:
    """dtype of frozen pretrained parts (text encoders by default; reward models and VAE when asked): as given, else
    bfloat16 on a machine with a GPU and float32 on one without."""
    if name is not None:
        return getattr(torch, name)
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32
