"""One run, one directory: ``--ckpt_path last`` finds the run's newest ``last.ckpt``, and a resumed or evaluated run
logs into the directory of the run its checkpoint came from instead of opening a new ``version_N``.

The rule (stated in the README): with a TensorBoard or CSV logger, ``last`` is the most recently written
``<save_dir>/<name>/version_*/checkpoints/last.ckpt`` (a file, or a directory for FSDP2's sharded checkpoints);
a checkpoint inside ``<save_dir>/<name>/version_N/checkpoints/`` makes the run log into ``version_N``; ``validate``
without a checkpoint logs into ``<save_dir>/<name>/validate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

_VERSIONED = ("TensorBoardLogger", "CSVLogger")  # loggers laid out as save_dir/name/version


def newest_last_checkpoint(runs: Path) -> Path | None:
    """The most recently written ``<runs>/version_*/checkpoints/last.ckpt``, if any."""
    found = list(runs.glob("version_*/checkpoints/last.ckpt"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def place_run(subcommand: str | None, config: Any, logger: Any) -> None:
    """Resolve ``ckpt_path: last`` and pin the logger's version as the module docstring says (in ``config``)."""
    if subcommand not in ("fit", "validate") or not _is_versioned(logger):
        return
    args = logger.init_args
    runs = Path(args.save_dir) / (args.get("name", "lightning_logs") or "")  # save_dir/name: the versions' parent
    ckpt = config.get("ckpt_path")
    if ckpt == "last":
        newest = newest_last_checkpoint(runs)
        if newest is None:
            rank_zero_info(f"--ckpt_path last: no {runs}/version_*/checkpoints/last.ckpt yet, so this run starts "
                           "from the beginning")
            config.ckpt_path = None
            return
        config.ckpt_path = ckpt = str(newest)
        rank_zero_info(f"--ckpt_path last: resuming from {newest}")
    if ckpt is not None and args.get("version") is None:
        path = Path(ckpt).resolve()
        if path.parent.name == "checkpoints" and path.parent.parent.parent == runs.resolve():
            args.version = path.parent.parent.name
    elif subcommand == "validate" and args.get("version") is None:
        args.version = "validate"


def _is_versioned(logger: Any) -> bool:
    class_path = getattr(logger, "class_path", "") or ""
    return class_path.rsplit(".", 1)[-1] in _VERSIONED and getattr(logger, "init_args", None) is not None
