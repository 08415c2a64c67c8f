"""precise-lightning command line: ``python cli.py fit --config configs/digits_precise.yaml``.

LightningCLI: ``fit`` / ``validate`` / ``test``, stacked ``--config`` files, dotted overrides
(``--model.sampler.init_args.eta 1.0``, ``--reward.weights '{pickscore: 1.0}'``, ``--ema.decay 0.95``),
``--print_config`` for a complete runnable config.
"""

from typing import Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from precise_lightning.callbacks import EMA, RewardScorer
from precise_lightning.data import PromptDataModule
from precise_lightning.hub import set_model_root
from precise_lightning.modules import GRPOModule
from precise_lightning.modules.checks import micro_slices


class GRPOCLI(LightningCLI):
    """Reward scoring and EMA are top-level sections (``reward:``, ``ema:``), not items of ``trainer.callbacks``,
    so that their arguments can be overridden from the command line and from stacked config files.
    ``model_root`` is a local directory laid out by hub id that pretrained parts load from first."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RewardScorer, "reward")
        parser.add_lightning_class_args(EMA, "ema")
        parser.add_argument(
            "--model_root", type=Optional[str], default=None,
            help="local directory laid out by hub id (ROOT/yuvalkirstain/PickScore_v1, ...) searched before the hub",
        )

    def before_instantiate_classes(self) -> None:
        set_model_root(self._get(self.config, "model_root"))
        model, data = self._get(self.config, "model"), self._get(self.config, "data")
        if data.group_size and data.batch_size % data.group_size == 0:  # else the DataModule says what is wrong
            micro_slices(data.batch_size, model.micro_batch_size, model.updates_per_rollout)  # before models load


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return GRPOCLI(
        GRPOModule,
        PromptDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # GRPOModule builds its optimizer from model.optimizer
    )


if __name__ == "__main__":
    main()
