"""Checkpoint files that are never half-written and never silently wrong.

Lightning's ``TorchCheckpointIO`` writes in place (a kill mid-write leaves a truncated ``last.ckpt``), swallows a
``PermissionError`` on save (``_atomic_save``: the run goes on without checkpoints), and nothing checks what it
reads back (torch's zip reader does not verify tensor bytes: a corrupt byte resumes with changed weights).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO


class CheckpointError(OSError):
    """A checkpoint that cannot be written, read or trusted."""


def content_digest(checkpoint: Any) -> str:
    """SHA-256 of a checkpoint's content (every tensor's dtype, shape and bytes, and every plain value, in key
    order), without its own ``integrity`` entry; objects of other types count by type name only."""
    digest = hashlib.sha256()

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                if key != "integrity":
                    digest.update(repr(key).encode())
                    visit(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__}{len(value)}".encode())
            for item in value:
                visit(item)
        elif isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        elif isinstance(value, np.ndarray):
            digest.update(f"{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
        elif value is None or isinstance(value, (bool, int, float, str, bytes)):
            digest.update(repr(value).encode())
        else:
            digest.update(type(value).__name__.encode())

    visit(checkpoint)
    return digest.hexdigest()


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in its own directory, flushes it to disk and renames it over the
    old one (a kill at any moment leaves the old or the new file whole); stores a :func:`content_digest` in it and
    checks it on load; a failed save raises at once."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        checkpoint["integrity"] = {"sha256": content_digest(checkpoint)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:  # torch's zip writer reports a full disk as a RuntimeError
            with contextlib.suppress(OSError):  # nothing to clean up where the directory itself is the problem
                tmp.unlink(missing_ok=True)
            previous = "the previous one is intact" if path.exists() else "no earlier one is there"
            raise CheckpointError(
                f"could not write the checkpoint {path}: {str(err).strip().splitlines()[-1]}. The run stops rather "
                f"than go on without checkpoints; {previous}. Free space or fix the directory's permissions "
                "(trainer.default_root_dir / the logger's save_dir) and resume"
            ) from err

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(Path(path), map_location=map_location, weights_only=weights_only)


def read_checkpoint(path: Path, neighbours: bool = True, **load_kwargs: Any) -> dict[str, Any]:
    """A checkpoint file read back and checked against its checksum; a file that is missing, unreadable or changed
    raises :class:`CheckpointError`, naming (``neighbours``) the newest intact checkpoint beside it."""
    try:
        return _read_verified(path, **load_kwargs)
    except CheckpointError as err:
        if not neighbours:
            raise
        raise CheckpointError(f"{err} {_newest_intact(path)}".rstrip()) from err.__cause__


# (path, size, mtime) of the files whose checksum matched in this process: a resume reads its checkpoint when the
# config is parsed and again when training restores it, and hashing a full fine-tune's state once is enough.
_VERIFIED: set[tuple[str, int, int]] = set()


def _read_verified(path: Path, **load_kwargs: Any) -> dict[str, Any]:
    if not path.is_file():
        what = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}.")
    try:
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives; a truncated one has no central directory
            raise ValueError("not a complete zip archive, which torch.save writes")
        checkpoint = torch.load(path, **{"map_location": "cpu", **load_kwargs})
    except Exception as err:  # torch's zip and unpickling errors: a truncated or garbled file
        raise CheckpointError(f"checkpoint {path} cannot be read ({str(err).splitlines()[0]}): it is truncated or "
                              "corrupt.") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a training checkpoint.")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    expected = checkpoint.get("integrity", {}).get("sha256")
    if expected is not None and key not in _VERIFIED:
        if content_digest(checkpoint) != expected:
            raise CheckpointError(f"checkpoint {path} does not match the checksum written with it: its content "
                                  "changed on disk.")
        _VERIFIED.add(key)
    return checkpoint


def _newest_intact(bad: Path) -> str:
    """Which other checkpoint of the same directory, newest first, reads back and matches its checksum."""
    if not bad.parent.is_dir():
        return ""
    for other in sorted((p for p in bad.parent.glob("*.ckpt") if p != bad and p.is_file()),
                        key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            _read_verified(other, mmap=True, weights_only=True)  # each neighbour is checked, never searched from
        except CheckpointError:
            continue
        return f"The newest intact checkpoint beside it is {other}: resume with --ckpt_path {other}"
    return "No intact checkpoint is beside it: resume from an earlier copy, or start afresh"
