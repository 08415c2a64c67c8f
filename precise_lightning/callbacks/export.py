"""Export of the trained weights in diffusers' format at the end of training."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from precise_lightning.callbacks.ema import EMA


class DiffusersExport(Callback):
    """At the end of ``fit``, write what trained with :meth:`Policy.save_trained` to ``DIR/lora`` (LoRA adapters,
    with their metadata; a stock pipeline's ``load_lora_weights(path)`` reads them) or ``DIR/transformer`` (full
    fine-tuning; ``Pipeline.from_pretrained(base, transformer=Model.from_pretrained(path))``), and with an
    :class:`EMA` callback the averaged weights, which evaluation uses, to ``DIR/lora_ema`` / ``DIR/transformer_ema``.

    Args:
        dirpath: where to write; default the logger's run directory (``logs/<name>/version_<n>``).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__()
        self.dirpath = dirpath

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Every rank takes part: trainer.log_dir is a broadcast and sharded weights are gathered; rank 0 writes.
        policy = pl_module.policy
        target = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir) / (
            "lora" if policy.lora_rank else "transformer"
        )
        policy.save_trained(target, write=trainer.is_global_zero)
        emas = [cb for cb in trainer.callbacks if isinstance(cb, EMA)]
        if emas:
            with emas[0].averaged(pl_module):
                policy.save_trained(target.with_name(target.name + "_ema"), write=trainer.is_global_zero)
        rank_zero_info(f"trained weights (diffusers format) written to {target}" + (" and *_ema" if emas else ""))
