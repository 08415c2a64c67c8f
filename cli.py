"""precise-lightning command line: ``python cli.py fit --config configs/digits_precise.yaml``.

LightningCLI: ``fit`` / ``validate`` / ``test``, stacked ``--config`` files, dotted overrides
(``--model.sampler.init_args.eta 1.0``), ``--print_config`` for a complete runnable config.
"""

from lightning.pytorch.cli import LightningCLI

from precise_lightning.data import PromptDataModule
from precise_lightning.modules import GRPOModule


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(
        GRPOModule,
        PromptDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # GRPOModule builds its optimizer from model.optimizer
    )


if __name__ == "__main__":
    main()
