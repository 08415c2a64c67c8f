"""One run, one directory: ``--ckpt_path last`` finds the run's newest ``last.ckpt``, and a resumed or evaluated run
logs into the directory of the run its checkpoint came from instead of opening a new ``version_N``.

The rule (stated in the README): with a TensorBoard or CSV logger, ``last`` is the most recently written
``<save_dir>/<name>/version_*/checkpoints/last.ckpt`` (a file, or a directory for FSDP2's sharded checkpoints);
a checkpoint inside ``<save_dir>/<name>/version_N/checkpoints/`` makes the run log into ``version_N``; ``validate``
without a checkpoint logs into ``<save_dir>/<name>/validate``. A directory takes one live ``fit`` at a time
(:class:`RunDirectory`).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO, Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
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


class RunDirectoryInUse(OSError):
    """A second live ``fit`` was pointed at a run directory."""


class RunDirectory(SaveConfigCallback):
    """Lightning's config saving, plus: a ``fit`` holds a lock on its run directory from its set-up to its end (a
    second live run there is refused before it writes anything; the lock dies with its process, so a crashed run
    leaves none behind and its resume gets the directory); every checkpoint carries the run's config (what a resume
    compares against); other subcommands write ``config_<subcommand>.yaml`` beside the run's ``config.yaml``."""

    _lock: IO[str] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # a broadcast: every process asks
        refused = None
        if stage == "fit" and trainer.is_global_zero and log_dir is not None:
            try:
                self._lock = lock_run_directory(Path(log_dir))
            except RunDirectoryInUse as err:
                refused = str(err)
        refused = trainer.strategy.broadcast(refused)  # every process stops, none waits on the others
        if refused:
            raise RunDirectoryInUse(refused)
        if stage != "fit":
            self.config_filename = f"config_{getattr(stage, 'value', stage)}.yaml"  # stage: a TrainerFn
        self._dumped = self.parser.dump(self.config, skip_none=False)
        super().setup(trainer, pl_module, stage)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["config"] = self._dumped

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None


def lock_run_directory(directory: Path) -> IO[str]:
    """An exclusive lock on ``directory/.lock`` (``flock``: held while the returned file is open, gone with its
    process), naming its holder; a directory another live run holds raises :class:`RunDirectoryInUse`."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirectoryInUse(
            f"run directory {directory} is in use by a live run ({holder}): two runs would write one config.yaml "
            "and one set of checkpoints. Wait for it to end (then --ckpt_path resumes it there), or give this run "
            "its own directory (another --trainer.logger.init_args.version, or none for the next free one)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle
