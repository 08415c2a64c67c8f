"""precise-lightning command line: ``python cli.py fit --config configs/digits_precise.yaml``.

LightningCLI: ``fit`` / ``validate``, stacked ``--config`` files, dotted overrides
(``--model.sampler.init_args.eta 1.0``, ``--reward.weights '{pickscore: 1.0}'``, ``--ema.decay 0.95``),
``--print_config`` for a complete runnable config.
"""

import os
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any, Optional, TypeVar

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from precise_lightning.callbacks import EMA, RewardScorer
from precise_lightning.cli_checks import check_config, check_yaml_files, short_parse_error
from precise_lightning.data import PromptDataModule
from precise_lightning.hub import set_model_root
from precise_lightning.modules import GRPOModule
from precise_lightning.resume import check_resume, saved_config
from precise_lightning.run_dirs import RunDirectory, place_run

T = TypeVar("T")


class _Parser(LightningArgumentParser):
    """A parse error prints the error and where to find the options (``--help``), not the 75-line usage block that
    buried the one line that matters."""

    def print_usage(self, file: Any = None) -> None:
        pass

    def error(self, message: str, *args: Any, **kwargs: Any) -> Any:
        return super().error(short_parse_error(message), *args, **kwargs)


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

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate`` (which evaluates a checkpoint on the held-out prompts): a GRPO module has no
        ``test_step`` or ``predict_step``, so Lightning's ``test`` and ``predict`` are not offered."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def _parse_ckpt_path(self) -> None:
        """Replaces Lightning's, which reads ``--ckpt_path FILE`` with a bare ``torch.load`` (a raw traceback for a
        bad file) and overwrites the ``model.*`` values given on the command line with the checkpoint's (no public
        switch turns it off): :meth:`before_instantiate_classes` reads it with the checked loader instead."""

    def before_instantiate_classes(self) -> None:
        """Checks that need no model, so that a bad value stops the run before anything loads."""
        set_model_root(self._get(self.config, "model_root"))
        config = self.config.get(self.subcommand, self.config)
        check_config(self.subcommand, config)
        place_run(self.subcommand, config, config.trainer.logger)
        ckpt = config.get("ckpt_path")
        if ckpt is not None and ckpt not in ("last", "hpc", "registry"):  # the others Lightning finds at fit time
            if self.subcommand == "fit":
                check_resume(ckpt, yaml.safe_load(self.parser.dump(self.config, skip_none=False))[self.subcommand])
            else:
                saved_config(Path(ckpt).expanduser())  # read and checked: the same errors as a resume


def main(args: list[str] | None = None, run: bool = True, cli_class: type[GRPOCLI] = GRPOCLI) -> LightningCLI:
    check_yaml_files(sys.argv[1:] if args is None else args)
    return cli_class(
        GRPOModule,
        PromptDataModule,
        args=args,
        run=run,
        save_config_callback=RunDirectory,
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
        own = _own_error(err)  # ours, or ours inside a parser's wrapping (a reward that failed to load in a union)
        if os.environ.get("PRECISE_LIGHTNING_DEBUG") or own is None:
            raise
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
            print(f"error: {own}\n(PRECISE_LIGHTNING_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


def _own_error(err: BaseException | None) -> BaseException | None:
    """The first error of ``err``'s chain (itself, its cause or context, ...) that one of this package's checks
    raised."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (ValueError, OSError)) and _raised_here(err):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _raised_here(err: BaseException) -> bool:
    """Whether the innermost frame that raised ``err`` is in this package (one of its checks)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


_PACKAGE = Path(__file__).resolve().parent
