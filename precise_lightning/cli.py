"""precise-lightning command line: ``python cli.py fit --config configs/digits_precise.yaml``.

LightningCLI: ``fit`` / ``validate`` / ``test``, stacked ``--config`` files, dotted overrides
(``--model.sampler.init_args.eta 1.0``, ``--reward.weights '{pickscore: 1.0}'``, ``--ema.decay 0.95``),
``--print_config`` for a complete runnable config.
"""

import os
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any, Optional, TypeVar

from jsonargparse.typing import import_object
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from precise_lightning.callbacks import EMA, RewardScorer
from precise_lightning.data import PromptDataModule
from precise_lightning.hub import set_model_root
from precise_lightning.modules import GRPOModule
from precise_lightning.modules.checks import micro_slices, refuse_float16
from precise_lightning.run_dirs import place_run

T = TypeVar("T")


class _Parser(LightningArgumentParser):
    """A parse error prints the error and where to find the options (``--help``), not the 75-line usage block that
    buried the one line that matters."""

    def print_usage(self, file: Any = None) -> None:
        pass


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
        """Checks that need no model, so that a bad value stops the run before anything loads."""
        set_model_root(self._get(self.config, "model_root"))
        model, data, trainer = (self._get(self.config, key) for key in ("model", "data", "trainer"))
        if data.group_size and data.batch_size % data.group_size == 0:  # else the DataModule says what is wrong
            micro_slices(data.batch_size, model.micro_batch_size, model.updates_per_rollout)
        refuse_float16(trainer.precision)  # the config's value: Lightning would turn it into bf16 on a CPU
        place_run(self.subcommand, self.config.get(self.subcommand, self.config), trainer.logger)
        if self.subcommand == "fit":
            per_rollout = model.updates_per_rollout * model.inner_epochs
            if trainer.max_steps > 0 and trainer.max_steps % per_rollout:
                raise ValueError(
                    f"trainer.max_steps ({trainer.max_steps}) counts optimizer steps and must be a multiple of those "
                    f"one rollout takes (model.updates_per_rollout x model.inner_epochs = {per_rollout}): e.g. "
                    f"{(trainer.max_steps // per_rollout + 1) * per_rollout}"
                )
            sampler = model.sampler
            if sampler is not None:  # the Sampler alone, on the uniform grid: zero noise does not depend on the grid
                init = {k: v for k, v in vars(sampler.init_args).items() if k != "grid"}
                import_object(sampler.class_path)(**init).check_trainable()


def main(args: list[str] | None = None, run: bool = True, cli_class: type[GRPOCLI] = GRPOCLI) -> LightningCLI:
    return cli_class(
        GRPOModule,
        PromptDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"allow_abbrev": False},
        parser_class=_Parser,  # `--model.clip_rang 0.1` must not silently set clip_range
        auto_configure_optimizers=False,  # GRPOModule builds its optimizer from model.optimizer
    )


def run(args: list[str] | None = None) -> None:
    """``python cli.py``: :func:`main` under :func:`user_errors`."""
    user_errors(main, args)


def user_errors(command: Callable[..., T], *args: Any) -> T:
    """``command(*args)``, with the errors a user is to fix (raised by this package's own checks: bad config values,
    files, checkpoints) printed as their message alone, once, with exit status 2; ``PRECISE_LIGHTNING_DEBUG=1``
    shows the traceback. Errors raised anywhere else keep their traceback."""
    try:
        return command(*args)
    except (ValueError, OSError) as err:
        if os.environ.get("PRECISE_LIGHTNING_DEBUG") or not _raised_here(err):
            raise
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
            print(f"error: {err}\n(PRECISE_LIGHTNING_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


def _raised_here(err: BaseException) -> bool:
    """Whether the innermost frame that raised ``err`` is in this package (one of its checks)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


_PACKAGE = Path(__file__).resolve().parent
