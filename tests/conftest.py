import os
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread per process, for this process and every process a test launches (they inherit the environment):
# tests share 2 cores with each other's subprocesses, and oversubscribed thread pools turned seconds into minutes.
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Model:
    """A registered pipeline policy with its recipe config: the tests' view of a base model."""

    policy: type
    config: str  # its recipe
    recipe: dict

    @property
    def pipeline(self) -> type:
        return self.policy.pipeline_class

    @property
    def hub_id(self) -> str:
        return self.policy.hub_id

    @property
    def guidance(self) -> float:  # the recipe's
        return self.recipe["model"]["policy"]["init_args"].get("guidance_scale", 1.0)

    @property
    def lora_rank(self) -> int:  # the recipe's
        return self.recipe["model"]["policy"]["init_args"]["lora_rank"]

    @property
    def linear_guidance(self) -> bool:
        from precise_lightning.policies import PipelinePolicy

        return self.policy.guide is PipelinePolicy.guide


def model_recipes() -> list[Model]:
    """Each registered policy with its recipe: the config that trains it (``*_precise.yaml`` where it has several)."""
    from precise_lightning.policies import pipeline_policies

    models = []
    for policy in pipeline_policies():
        configs = []
        for path in sorted((ROOT / "configs").glob("*.yaml"), key=lambda p: (not p.stem.endswith("_precise"), p.name)):
            recipe = yaml.safe_load(path.read_text())
            class_path = ((recipe or {}).get("model") or {}).get("policy", {}).get("class_path", "")
            if class_path.rsplit(".", 1)[-1] == policy.__name__:
                configs.append((path, recipe))
        assert configs, f"{policy.__name__} has no recipe config in configs/"
        path, recipe = configs[0]
        models.append(Model(policy, str(Path("configs") / path.name), recipe))
    return models


def demo_args(log_dir: Path, *extra: str, batch_size: int = 32, micro_batch_size: int = 16) -> list[str]:
    """CLI arguments of the demo config shrunk for tests: a small base model, 4 rollouts, logs under ``log_dir``."""
    return [
        "--config", "configs/digits_precise.yaml",
        "--model.policy.init_args.hidden", "64",
        "--model.policy.init_args.pretrain_steps", "30",
        "--trainer.logger.init_args.save_dir", str(log_dir),
        "--trainer.max_steps", "8",
        "--trainer.val_check_interval", "3",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--data.batch_size", str(batch_size),
        "--data.eval_batch_size", "16",
        "--data.eval_repeats", "2",
        "--model.micro_batch_size", str(micro_batch_size),
        *extra,
    ]


def run_dir(log_dir: Path) -> Path:
    """The one ``name/version_N`` directory a run wrote under ``log_dir``."""
    (version,) = list(Path(log_dir).glob("*/version_*"))
    return version


def tensorboard(version: Path) -> EventAccumulator:
    """What a run wrote to TensorBoard (``.Tags()``, ``.Scalars(tag)``, ``.Images(tag)``, ...)."""
    acc = EventAccumulator(str(version))
    acc.Reload()
    return acc


def scalars(version: Path) -> dict[str, list[float]]:
    """Every scalar a run logged to TensorBoard, by tag, in step order."""
    acc = tensorboard(version)
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(autouse=True)
def _in_repo_with_a_shared_cache(tmp_path_factory, monkeypatch):
    """Tests run from the repository root (configs are relative paths) and share one cache of demo base models."""
    monkeypatch.chdir(ROOT)
    base = tmp_path_factory.getbasetemp()  # under pytest-xdist a worker's; its parent is this run's, shared
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # (cached files are written atomically)
    monkeypatch.setenv("PRECISE_LIGHTNING_CACHE", str(shared / "cache"))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """Tiny models written once per session by the user-facing command ``python -m precise_lightning.tiny DIR``."""
    root = tmp_path_factory.mktemp("tiny_models")
    with mock.patch.object(sys, "argv", ["precise_lightning.tiny", str(root)]):
        runpy.run_module("precise_lightning.tiny", run_name="__main__")
    return root


@pytest.fixture
def model_root(tiny_root):
    """Hub ids resolve to the tiny models for the duration of a test."""
    from precise_lightning.hub import set_model_root

    set_model_root(str(tiny_root))
    yield tiny_root
    set_model_root(None)
