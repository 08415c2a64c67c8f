"""Reward mixes, held-out evaluation metrics, and the reward / ema / model_root sections of the command line."""


import json

import numpy as np
import pytest
import yaml
import torch

import cli
from conftest import ROOT, demo_args, run_dir, tensorboard
from precise_lightning.callbacks import EMA, RewardScorer
from precise_lightning.rewards import CLIPScore, HPSv2, PickScore, Reward


class Fixed(Reward):
    """A reward that returns given values (and counts its calls)."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values, self.calls = torch.tensor(values), 0

    def forward(self, images, prompts):
        self.calls += 1
        return self.values[: len(images)]


def test_raw_weighted_sum():
    scorer = RewardScorer({"a": Fixed([1.0, 2.0, 3.0]), "b": Fixed([10.0, 0.0, -10.0])}, weights={"a": 0.5})
    total, parts = scorer.score(torch.zeros(3, 3, 4, 4), ["p"] * 3)
    torch.testing.assert_close(total, torch.tensor([10.5, 1.0, -8.5]))  # b weighs 1 by default
    torch.testing.assert_close(parts["a"], torch.tensor([1.0, 2.0, 3.0]))


def test_z_normalised_mix_is_the_precise_code_s():
    """rl_trainer.py's normalize_rewards block, by hand in numpy: (r - mean) / (np.std(r) + 1e-8) per component."""
    a, b = [1.0, 2.0, 3.0, 6.0], [100.0, 300.0, 200.0, 400.0]
    scorer = RewardScorer({"a": Fixed(a), "b": Fixed(b)}, weights={"a": 2.0, "b": 1.0}, normalize=True)
    total, parts = scorer.score(torch.zeros(4, 3, 4, 4), ["p"] * 4)
    z = lambda v: (np.array(v) - np.mean(v)) / (np.std(v) + 1e-8)  # noqa: E731 - numpy's std is the population's
    torch.testing.assert_close(total, torch.tensor(2 * z(a) + z(b), dtype=torch.float32))
    torch.testing.assert_close(parts["b"], torch.tensor(b))  # components are logged raw


def test_precise_flux_mix_is_the_normalised_sum_of_the_published_scorers(model_root):
    """The Precise FLUX.2 Klein mix as the recipe configures it: PickScore, CLIPScore and HPSv2.1 z-normalised and
    summed with weight 1; the published scorers' /26 and /30 change nothing after normalisation."""
    run_config = yaml.safe_load((ROOT / "configs/flux2_klein_precise.yaml").read_text())["reward"]
    assert run_config["normalize"] is True and "weights" not in run_config
    rewards = {"pickscore": PickScore(), "clipscore": CLIPScore(), "hpsv2": HPSv2()}
    images, prompts = torch.rand(4, 3, 40, 40), ["a cat", "a dog", "a cat", "a fox"]
    total, parts = RewardScorer(rewards, normalize=True).score(images, prompts)
    z = lambda v: (v - v.mean()) / (v.std(unbiased=False) + 1e-8)  # noqa: E731
    torch.testing.assert_close(total, sum(z(parts[n]) for n in rewards), rtol=1e-5, atol=1e-5)
    scaled, _ = RewardScorer(rewards, weights={}, normalize=True).score(images, prompts)
    parts_scaled = {"pickscore": parts["pickscore"] / 26, "clipscore": parts["clipscore"] / 30, "hpsv2": parts["hpsv2"]}
    torch.testing.assert_close(sum(z(v) for v in parts_scaled.values()), scaled, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(rewards={}), r"at least one reward model \(reward.rewards\)"),
        (dict(rewards={"a": Fixed([1.0])}, weights={"b": 1.0}), r"reward.weights name unknown rewards \['b'\]"),
        (dict(rewards={"a": Fixed([1.0])}, metrics={"a": Fixed([1.0])}), r"reward.metrics \['a'\] are also training"),
    ],
)
def test_bad_reward_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardScorer(**kwargs)


def _demo(tmp_path, *extra):
    return demo_args(tmp_path, "--trainer.max_steps", "6", "--data.eval_batch_size", "8", *extra,
                     batch_size=16, micro_batch_size=8)


def test_held_out_metrics_are_logged_at_evaluation_and_never_scored_on_rollouts(tmp_path, tiny_root):
    """The shipped overlay: demo + the paper's held-out metrics, tiny weights from a model root."""
    run = cli.main(_demo(tmp_path, "--config", "configs/heldout_metrics.yaml", "--model_root", str(tiny_root)),
                   run=False)
    scorer = next(cb for cb in run.trainer.callbacks if isinstance(cb, RewardScorer))
    assert {type(m) for m in scorer.metrics.values()} == {PickScore, HPSv2, CLIPScore}
    calls = {name: 0 for name in scorer.metrics}
    for name, metric in scorer.metrics.items():
        metric.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    run.trainer.fit(run.model, datamodule=run.datamodule)
    val_batches = len(run.datamodule.val_dataloader())  # two evaluations: at the start and after rollout 3
    assert run.trainer.global_step == 6 and val_batches >= 1
    assert calls == {name: 2 * val_batches for name in scorer.metrics}  # evaluation only: 3 rollouts ran too
    acc = tensorboard(run_dir(tmp_path))
    tags = acc.Tags()["scalars"]
    for name in ("pickscore", "hpsv2", "clipscore"):
        assert f"eval/{name}" in tags and f"train/reward_{name}" not in tags
        events = acc.Scalars(f"eval/{name}")
        assert len(events) == 2 and all(torch.isfinite(torch.tensor(e.value)) for e in events)
    assert "eval/reward_digit" in tags and "train/reward_digit" in tags


def test_reward_and_ema_are_overridable_from_the_command_line(tmp_path):
    run = cli.main(_demo(tmp_path, "--reward.weights", "{digit: 2.5}", "--reward.normalize", "true",
                         "--ema.decay", "0.95", "--ema.every_n_steps", "4"), run=False)
    scorer = next(cb for cb in run.trainer.callbacks if isinstance(cb, RewardScorer))
    ema = next(cb for cb in run.trainer.callbacks if isinstance(cb, EMA))
    assert scorer.weights == {"digit": 2.5} and scorer.normalize
    assert (ema.decay, ema.every_n_steps) == (0.95, 4)
    run = cli.main(_demo(tmp_path, "--reward.weights.digit", "0.5"), run=False)
    assert next(cb for cb in run.trainer.callbacks if isinstance(cb, RewardScorer)).weights == {"digit": 0.5}


def test_a_config_without_a_reward_section_fails_at_parse(tmp_path, capsys):
    bare = tmp_path / "bare.yaml"
    bare.write_text("\n".join(line for line in (ROOT / "configs/digits_precise.yaml").read_text().splitlines()
                              if not line.startswith(("reward:", "  rewards:", "    digit:", "      class_path: "
                                                      "precise_lightning.rewards"))))
    with pytest.raises(SystemExit):
        cli.main(["--config", str(bare)], run=False)
    assert "the following arguments are required: reward.rewards" in capsys.readouterr().err


def test_bad_model_root_fails_at_parse(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_root '/no/such/root' is not a directory"):
        cli.main(_demo(tmp_path, "--model_root", "/no/such/root"), run=False)


class Recorder(Reward):
    """A reward that asks for the prompts' metadata and records it (its score: the digit's tag length)."""

    wants_metadata = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict] = []

    def forward(self, images, prompts, metadata):
        self.seen += metadata
        return torch.tensor([float(len(m.get("tag", ""))) for m in metadata])


def test_jsonl_metadata_reaches_the_rewards_that_ask_for_it(tmp_path):
    """A JSONL prompt file's other fields reach, per image, a reward that sets wants_metadata, in rollouts and in
    evaluation; a reward that does not is called as before."""
    words = ["zero", "one", "two", "three"]
    lines = [json.dumps({"prompt": f"a handwritten digit {d}", "tag": words[d], "include": [{"count": d}]})
             for d in range(4)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines * 2))
    (tmp_path / "eval.jsonl").write_text("\n".join(lines))
    run = cli.main(_demo(tmp_path, "--trainer.max_steps", "2", "--data.train_file", str(tmp_path / "train.jsonl"),
                         "--data.eval_file", str(tmp_path / "eval.jsonl"), "--data.eval_batch_size", "4",
                         "--data.eval_repeats", "1"), run=False)
    scorer = next(cb for cb in run.trainer.callbacks if isinstance(cb, RewardScorer))
    recorder, plain = Recorder(), Fixed([0.5] * 16)
    scorer.rewards = {"tagged": recorder, "plain": plain}
    scorer.weights = {"tagged": 1.0, "plain": 1.0}
    run.model.eval_means.clear()
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert plain.calls > 0 and len(recorder.seen) == 16 + 4  # one rollout of 16, the evaluation at start of 4
    for meta in recorder.seen:
        d = words.index(meta["tag"])
        assert meta == {"tag": words[d], "include": [{"count": d}]}
