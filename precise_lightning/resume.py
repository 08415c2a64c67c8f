"""Resuming: ``--ckpt_path last`` and ``--ckpt_path FILE`` are one resume. The checkpoint is read and checked when
the config is parsed (before any model loads) by the same reader training uses, and the values of this run's config
win over the ones saved with the checkpoint: the run says which saved values it changed and whether it still
resumes exactly (the same numbers as a run that was never stopped)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.utilities.load import _METADATA_FILENAME  # FSDP2 sharded checkpoints: the non-tensor state
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from precise_lightning.checkpoint_io import CheckpointError, read_checkpoint

# Run length, how the checkpoint is read and where logs go: changed on every resume, and nothing a resumed run
# computes depends on them.
NOT_COMPARED = ("ckpt_path", "weights_only", "trainer.max_steps", "trainer.max_epochs", "trainer.max_time",
                "trainer.logger", "trainer.enable_progress_bar", "trainer.enable_model_summary",
                "trainer.default_root_dir")
# Evaluation, logging and checkpointing: the trained weights do not depend on them (evaluation noise has its own
# seeds, the EMA weights never feed back into training).
EVALUATION_ONLY = ("model.eval_sampler", "model.extra_eval_samplers", "model.eval_seed", "model.eval_at_start",
                   "data.eval_file", "data.eval_batch_size", "data.eval_repeats", "reward.metrics", "ema",
                   "trainer.val_check_interval", "trainer.check_val_every_n_epoch", "trainer.num_sanity_val_steps",
                   "trainer.limit_val_batches", "trainer.log_every_n_steps", "trainer.callbacks", "model_root")


def saved_config(path: Path) -> tuple[dict[str, Any] | None, bool]:
    """The config saved with a checkpoint (a file, or an FSDP2 sharded directory's metadata), read and checked as
    training reads it, and whether it is the whole config (older checkpoints hold the module's hyperparameters
    only; None: neither). Raises :class:`CheckpointError`."""
    if path.is_dir():
        if not (path / _METADATA_FILENAME).is_file():
            raise CheckpointError(f"checkpoint {path} is a directory without {_METADATA_FILENAME}: not a sharded "
                                  "checkpoint. Give a .ckpt file or the directory of a sharded one")
        path = path / _METADATA_FILENAME
    checkpoint = read_checkpoint(path, mmap=True, weights_only=True)
    if "config" in checkpoint:
        return yaml.safe_load(checkpoint["config"]), True
    hparams = checkpoint.get("hyper_parameters")
    return ({"model": dict(hparams)} if hparams else None), False


def config_changes(saved: dict[str, Any], current: dict[str, Any], whole: bool = True) -> tuple[list[str], list[str]]:
    """``key: saved -> current`` for each value that differs, split into those that change training and those that
    change only evaluation and logging (:data:`EVALUATION_ONLY`); :data:`NOT_COMPARED` keys are left out. Not
    ``whole``: only the keys ``saved`` holds are compared."""
    before, after = _flat(saved), _flat(current)
    if not whole:
        after = {k: v for k, v in after.items() if k in before}
    training, evaluation = [], []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, "<unset>"), after.get(key, "<unset>")
        if old == new or _under(key, NOT_COMPARED):
            continue
        (evaluation if _under(key, EVALUATION_ONLY) else training).append(f"{key}: {old!r} -> {new!r}")
    return training, evaluation


def check_resume(ckpt_path: str, current: dict[str, Any]) -> None:
    """Read and check the checkpoint, then say which of its saved values this run's config changes (those win)."""
    path = Path(ckpt_path).expanduser()
    saved, whole = saved_config(path)
    if saved is None:
        rank_zero_info(f"--ckpt_path {path}: no config was saved with it, so changed values cannot be listed")
        return
    training, evaluation = config_changes(saved, current, whole)
    parts = [("changing training (the resumed run will not give the numbers of an uninterrupted one)", training),
             ("changing evaluation and logging only (training resumes exactly)", evaluation)]
    listed = "".join(f"\n  {title}:" + "".join(f"\n    {line}" for line in lines) for title, lines in parts if lines)
    if listed:
        rank_zero_warn(f"--ckpt_path {path}: this run's config changes values saved with the checkpoint; this "
                       f"run's values are used,{listed}")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)
