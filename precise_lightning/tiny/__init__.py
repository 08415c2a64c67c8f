"""Tiny random-weight models of the published classes, for tests and CPU runs without a download.

``python -m precise_lightning.tiny DIR`` writes them under ``DIR`` laid out by hub id
(``DIR/yuvalkirstain/PickScore_v1``, ...); ``model_root: DIR`` (``configs/tiny_cpu.yaml``) makes the real configs
load them through the same loading code as the real weights.
"""

from __future__ import annotations

from pathlib import Path

from precise_lightning.tiny.rewards import write_rewards


def write_tiny(root: str | Path) -> Path:
    """Write every tiny model under ``root``; returns it."""
    root = Path(root)
    write_rewards(root, "tiny")
    return root
