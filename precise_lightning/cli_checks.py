"""What a parsed config alone shows to be wrong, raised before any model loads (one ``error:`` paragraph, exit 2,
through :func:`precise_lightning.cli.user_errors`), and the parser's own messages made as short."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse.typing import import_object
from lightning.pytorch.strategies import ModelParallelStrategy

from precise_lightning.data.prompts import read_prompts
from precise_lightning.modules.checks import check_precision, check_settings, micro_slices
from precise_lightning.rewards.reward import Reward

SETTINGS = ("clip_range", "adv_clip_max", "beta", "kl_form", "kl_eta", "log_prob_form", "ratio_norm", "std_scope",
            "std_eps", "train_fraction", "inner_epochs", "micro_batch_size", "updates_per_rollout", "max_grad_norm",
            "max_bad_iterations")


def check_config(subcommand: str | None, config: Any) -> None:
    """Every check that needs only the config's values (``config``: the subcommand's parsed namespace)."""
    model, data, trainer = config.model, config.data, config.trainer
    check_settings(**{name: model[name] for name in SETTINGS})
    if trainer.max_steps != -1 and trainer.max_steps < 1:
        raise ValueError(f"trainer.max_steps must be a positive number of optimizer steps (or -1: no limit), got "
                         f"{trainer.max_steps}")
    if data.group_size and data.batch_size % data.group_size == 0:  # else the DataModule says what is wrong
        micro_slices(data.batch_size, model.micro_batch_size, model.updates_per_rollout)
    check_precision(trainer.precision)
    if str(trainer.precision) in ("16", "16-mixed") and is_sharded(trainer.strategy):
        raise ValueError("trainer.precision 16-mixed: the sharded strategy (FSDP2) has no gradient scaler here; "
                         "use --trainer.precision bf16-mixed with configs/fsdp.yaml")
    check_optimizer(model.optimizer)
    for key, path in _output_dirs(trainer):
        check_writable_dir(path, key)
    if model.policy is not None and getattr(model.policy, "class_path", None):
        import_object(model.policy.class_path).check_arguments(_plain(model.policy.get("init_args")))
    check_reward_prompts(config.reward, data)
    if subcommand == "fit":
        per_rollout = model.updates_per_rollout * model.inner_epochs
        if trainer.max_steps > 0 and trainer.max_steps % per_rollout:
            raise ValueError(
                f"trainer.max_steps ({trainer.max_steps}) counts optimizer steps and must be a multiple of those "
                f"one rollout takes (model.updates_per_rollout x model.inner_epochs = {per_rollout}): e.g. "
                f"{(trainer.max_steps // per_rollout + 1) * per_rollout}"
            )
        sampler = model.sampler
        if sampler is not None and model.get("objective") is None:  # PPO's log-probs; the Sampler alone, on the uniform grid: zero noise does not depend on the grid
            init = {k: v for k, v in _plain(sampler.init_args).items() if k != "grid"}
            import_object(sampler.class_path)(**init).check_trainable()


def is_sharded(strategy: Any) -> bool:
    """Whether a config's ``trainer.strategy`` (a name or a ``class_path``) is FSDP2's ModelParallelStrategy."""
    path = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", "")
    try:
        return issubclass(import_object(path), ModelParallelStrategy)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def check_optimizer(optimizer: Any) -> None:
    """The optimizer built once on a stand-in parameter, so that torch's own checks (lr, betas, eps) run now."""
    if optimizer is None or not getattr(optimizer, "class_path", None):
        return
    try:
        import_object(optimizer.class_path)([torch.nn.Parameter(torch.zeros(1))], **_plain(optimizer.init_args))
    except (ValueError, TypeError) as err:
        raise ValueError(f"model.optimizer ({optimizer.class_path}) refuses its init_args: {err}") from None


def check_writable_dir(path: str, key: str) -> None:
    """``path`` is, or can be made, a directory this process can write."""
    existing = Path(path).expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{key} {path!r} cannot be a directory: {existing} is a file. Give a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{key} {path!r}: {existing} cannot be written by this user (or is on a read-only "
                              "file system). Give a directory you can write")


def check_reward_prompts(reward: Any, data: Any) -> None:
    """The prompts of the files each reward sees (training rewards: both files; held-out metrics: the evaluation
    prompts) carry the fields its class names in ``required_metadata`` and pass its ``prompt_problem``."""
    for section in ("rewards", "metrics"):
        for name, spec in (reward.get(section) or {}).items():
            cls = import_object(spec.class_path) if spec else None
            required = getattr(cls, "required_metadata", ())
            problem = getattr(cls, "prompt_problem", None)
            if not required and (problem is None or problem.__func__ is Reward.prompt_problem.__func__):
                continue
            label = f"reward.{section}.{name} ({spec.class_path.rsplit('.', 1)[-1]})"
            files = [data.eval_file or data.train_file] + ([data.train_file] if section == "rewards" else [])
            for path in dict.fromkeys(f for f in files if f):
                records = read_prompts(path)
                missing = [r["prompt"] for r in records if any(k not in r for k in required)]
                if missing:
                    raise ValueError(
                        f"{label} needs the fields {list(required)} on every prompt, and {path} lacks them on "
                        f"{len(missing)} of its {len(records)} (e.g. {missing[0]!r}): use a .jsonl prompt file "
                        "whose lines carry them (for GenEval, its own metadata files: see the README)"
                    )
                for number, record in enumerate(records, start=1):
                    reason = problem(record["prompt"])
                    if reason:
                        raise ValueError(f"{label} cannot score prompt {number} of {path}: {reason}")


def check_yaml_files(args: list[str]) -> None:
    """Each ``--config FILE`` parses as YAML; else an error that names the file (the parser's does not)."""
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.partition("=")[2]
        else:
            continue
        if Path(path).is_file():
            try:
                yaml.safe_load(Path(path).read_text())
            except yaml.YAMLError as err:
                where = getattr(err, "problem_mark", None)
                at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ValueError(f"config file {path} is not valid YAML{at}: {problem}") from None


def short_parse_error(message: str) -> str:
    """jsonargparse's report of a value of the wrong type (a nested block per union member, 12-17 lines) as one
    line: the full key, the value given and the types it takes; any other message as it is. Nested parsers (a
    class's ``init_args``) report first, so an inner line already made short is taken in with the outer key."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    inner = re.search(r"--([\w.]+): ('.*?') is not a valid value (\(it takes .*?\))", message)
    if keys and inner:
        return f"--{keys[0]}.init_args.{inner[1]}: {inner[2]} is not a valid value {inner[3]}"
    given = re.findall(r"(?:Given|Got) value: (.+?)(?:\. Got value: .*)?$", message, flags=re.M)
    expected = list(dict.fromkeys(re.findall(r"Expected an? <class '([\w.]+)'>", message)))
    if not keys or not given or not expected:
        return message
    key = keys[0] + "".join(f".init_args.{k}" for k in keys[1:])
    types = [t for t in expected if t != "NoneType"] or expected
    nullable = ", or null" if "NoneType" in expected and len(expected) > 1 else ""
    return f"--{key}: {given[0]!r} is not a valid value (it takes {' or '.join(types)}{nullable})"


def _output_dirs(trainer: Any) -> list[tuple[str, str]]:
    dirs = [("trainer.default_root_dir", trainer.default_root_dir)] if trainer.get("default_root_dir") else []
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for logger in loggers:
        init = getattr(logger, "init_args", None)
        if init is not None and init.get("save_dir"):
            dirs.append(("trainer.logger.init_args.save_dir", init.save_dir))
    return dirs


def _plain(namespace: Any) -> dict[str, Any]:
    """init_args as a dict (nested class specs stay namespaces)."""
    if namespace is None:
        return {}
    return dict(vars(namespace)) if not isinstance(namespace, dict) else dict(namespace)
