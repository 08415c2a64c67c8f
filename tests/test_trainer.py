"""End to end: the demo config through the CLI, the ratio invariant, checkpoints with EMA, config errors."""

import math
import warnings

import pytest
import torch
import yaml

import cli
from conftest import ROOT, demo_args, run_dir, scalars, tensorboard
from precise_lightning.callbacks import EMA, RewardScorer
from precise_lightning.modules import GRPOModule
from precise_lightning.policies import DigitsPolicy
from precise_lightning.sampling import Sampler

# The demo's configs (overlays have no model section; the base-model recipes are parsed in test_sd3.py).
CONFIGS = [p for p in sorted((ROOT / "configs").glob("*.yaml"))
           if "DigitsPolicy" in str(yaml.safe_load(p.read_text()).get("model", {}).get("policy"))]


def test_demo_fit_changes_weights_and_logs_finite_scalars(tmp_path):
    run = cli.main(demo_args(tmp_path, "--trainer.default_root_dir", str(tmp_path)), run=False)
    before = {n: p.detach().clone() for n, p in run.model.policy.named_trainable_parameters()}
    run.trainer.fit(run.model, datamodule=run.datamodule)
    after = dict(run.model.policy.named_trainable_parameters())
    assert run.trainer.global_step == 8
    assert any(not torch.equal(before[n], after[n]) for n in before)
    logged = scalars(run_dir(tmp_path))
    for tag in ["train/reward", "train/reward_digit", "train/kl", "train/clip_fraction", "train/approx_kl",
                "train/ratio_mean", "train/ratio_min", "train/ratio_max", "train/grad_norm", "time/encode_s", "time/rollout_s",
                "time/reward_s", "time/update_s", "eval/reward", "eval/reward_digit", "ema/decay", "perf/s_per_rollout",
                "perf/images_per_s", "train/flat_groups", "train/skipped_updates", "train/reward_std"]:
        assert tag in logged, tag
    for tag, values in logged.items():
        assert all(math.isfinite(v) for v in values), tag
    assert logged["train/ratio_drift_first"] == [0.0] * 4  # ratio exactly 1 before each rollout's first update
    shares = [logged[f"train/step_share/step_{i:02d}"] for i in range(9)]  # the 9 trained steps' shares of dL/dv
    assert all(abs(sum(per_step) - 1) < 1e-5 for per_step in zip(*shares)) and min(map(min, shares)) > 0
    assert len(logged["eval/reward"]) == 2  # the starting weights (eval_at_start), then after rollout 3
    assert "eval/samples" in tensorboard(run_dir(tmp_path)).Tags()["images"]
    run.trainer.save_checkpoint(tmp_path / "final.ckpt")
    state = torch.load(tmp_path / "final.ckpt", map_location="cpu", weights_only=False)
    ema_state = next(v for k, v in state["callbacks"].items() if k.startswith("EMA"))
    assert set(ema_state["shadow"]) == set(before) and ema_state["num_updates"] == 1  # at step 8
    # `validate --ckpt_path` restores the EMA and evaluates with it
    again = cli.main(demo_args(tmp_path / "validate"), run=False)
    ema = next(cb for cb in again.trainer.callbacks if isinstance(cb, EMA))
    again.trainer.validate(again.model, datamodule=again.datamodule, ckpt_path=tmp_path / "final.ckpt", verbose=False)
    assert ema.num_updates == 1
    for name, value in ema.shadow.items():  # swapped back after evaluation: shadow holds the EMA again
        torch.testing.assert_close(value, ema_state["shadow"][name])


def _module(tmp_path, **kwargs) -> GRPOModule:
    policy = DigitsPolicy(hidden=32, pretrain_steps=5, lora_rank=kwargs.pop("lora_rank", 0),
                          lora_targets=kwargs.pop("lora_targets", None))
    return GRPOModule(policy, sampler=kwargs.pop("sampler", Sampler("precise", num_steps=5)), **kwargs)


@pytest.mark.parametrize("ratio_norm", [False, True])
@pytest.mark.parametrize("rule", ["precise", "flow_sde", "cps", "precise_2m"])
def test_ratio_is_exactly_one_at_first_inner_step(tmp_path, rule, ratio_norm):
    module = _module(tmp_path, sampler=Sampler(rule, num_steps=5), micro_batch_size=3, ratio_norm=ratio_norm, beta=0.1)
    prompts = [f"a handwritten digit {i % 10}" for i in range(9)]
    cond = module.policy.encode(prompts)
    slices = module._micro_slices(9)
    noise = torch.randn(9, 1, 8, 8)
    trajectories, images = module.rollout(cond, noise, slices, torch.Generator().manual_seed(0))
    assert images.shape == (9, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    for m, s in enumerate(slices):
        for i in trajectories[m].sde_steps:
            mean_ref = module._reference_means(trajectories[m], cond[s], [i])[i]
            out = module._step_loss(trajectories[m], cond[s], torch.ones(3), i, mean_ref)
            assert out["ratio_max_dev"] == 0.0 and out["approx_kl"] == 0.0
            assert out["kl"] == 0.0  # policy == reference before training
            out["loss"].backward()


@pytest.mark.parametrize("rule", ["precise", "precise_2m"])
def test_demo_runs_in_bf16_mixed_with_ratio_exactly_one(tmp_path, rule):
    run = cli.main(demo_args(tmp_path, "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "4",
                             "--model.sampler.init_args.rule", rule), run=False)
    before = {n: p.detach().clone() for n, p in run.model.policy.named_trainable_parameters()}
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.callback_metrics["train/ratio_drift_first"] == 0
    after = dict(run.model.policy.named_trainable_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in after.values())  # master weights
    module = run.model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cond = module.policy.encode(["a handwritten digit 3"] * 4)
        trajectories, _ = module.rollout(cond, torch.randn(4, 1, 8, 8), [slice(0, 4)], None)
        assert module.policy.velocity(torch.randn(4, 1, 8, 8), torch.tensor(0.5), cond).dtype == torch.bfloat16
    assert trajectories[0].log_probs.dtype == torch.float32


def test_lora_policy_trains_adapters_only_and_reference_disables_them(tmp_path):
    module = _module(tmp_path, lora_rank=4, lora_targets=["inp", "mid1", "mid2", "out"], beta=0.1)
    names = [n for n, _ in module.policy.named_trainable_parameters()]
    assert names and all("lora_" in n for n in names)
    assert module.policy.reference_denoiser is None  # no copy: adapters off is the reference
    with torch.no_grad():
        for p in module.policy.trainable_parameters():
            p.add_(0.5)
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor(0.5), module.policy.encode(["1", "2"])
    v = module.policy.velocity(x, t, cond)
    with module.policy.reference():
        v_ref = module.policy.velocity(x, t, cond)
    base = module.policy.denoiser.get_base_model()
    with module.policy.denoiser.disable_adapter():
        torch.testing.assert_close(v_ref, base(x, t, cond))
    assert not torch.allclose(v, v_ref)
    # leaving the reference restores the adapters and their trainability
    torch.testing.assert_close(module.policy.velocity(x, t, cond), v)
    assert [n for n, _ in module.policy.named_trainable_parameters()] == names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config):
    run = cli.main(["--config", str(config), "--model.policy.init_args.pretrain_steps", "5",
                    "--model.policy.init_args.hidden", "32"], run=False)
    assert isinstance(run.model, GRPOModule)
    assert any(isinstance(cb, RewardScorer) for cb in run.trainer.callbacks)


def test_print_config_is_complete_and_runnable(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", *demo_args(tmp_path), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for key in ("class_path: precise_lightning.sampling.Sampler", "rule: precise", "group_size: 8", "clip_range"):
        assert key in printed
    config = tmp_path / "full.yaml"
    config.write_text(printed)
    run = cli.main(["fit", "--config", str(config), "--trainer.max_steps", "2"])
    assert run.trainer.global_step == 2 and run.model.sampler.rule == "precise"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model.sampler.init_args.rule", "euler"], r"unknown step rule 'euler'; choose one of \['cps'"),
        (["--model.sampler.init_args.rule", "ode"], "the training sampler must be stochastic"),
        (["--data.group_size", "1"], "group_size must be >= 2"),
        (["--data.batch_size", "30"], r"batch_size \(30\) must be a positive multiple of group_size \(8\): e.g. 32"),
        (["--data.train_file", "missing.txt"], "prompt file 'missing.txt' does not exist"),
        (["--model.clip_range", "0"], "clip_range must be > 0"),
    ],
)
def test_bad_configs_fail_with_a_message(tmp_path, extra, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        cli.main(demo_args(tmp_path, *extra), run=False)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model.sampler.init_args.eta", "0"], r"adds no noise on trained steps \[0, 1, 2, 3, 4, 5, 6, 7, 8\]"),
        (["--model.sampler.init_args.rule", "flow_sde", "--model.sampler.init_args.eta", "0"], "adds no noise"),
        (["--trainer.max_steps", "3"], r"trainer.max_steps \(3\) counts optimizer steps .* = 2\): e.g. 4"),
        (["--trainer.precision", "16-true"], "'16-true' trains float16 weights"),
    ],
    ids=["precise-eta-0", "flow-eta-0", "max-steps", "float16"],
)
def test_silent_no_ops_are_refused_before_any_model_loads(tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr("precise_lightning.policies.digits.DigitsFlowNet",
                        lambda *a, **k: pytest.fail("a model was built before the check"))
    with pytest.raises(ValueError, match=message):
        cli.main(["fit", *demo_args(tmp_path, *extra)])


def test_micro_batches_must_split_evenly_checked_at_parse(tmp_path, monkeypatch):
    monkeypatch.setattr("precise_lightning.policies.digits.DigitsFlowNet",
                        lambda *a, **k: pytest.fail("a model was built before the check"))
    with pytest.raises(ValueError, match=r"data.batch_size \(32\) must split into micro-batches of 12"):
        cli.main(demo_args(tmp_path, "--model.micro_batch_size", "12"), run=False)
    with pytest.raises(ValueError, match=r"whose number is a multiple of model.updates_per_rollout \(3\)"):
        cli.main(demo_args(tmp_path, "--model.updates_per_rollout", "3"), run=False)


def test_progress_bar_counts_rollouts_of_the_run(tmp_path, capsys):
    run = cli.main(demo_args(tmp_path, "--trainer.enable_progress_bar", "true"), run=False)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    bar = run.trainer.progress_bar_callback
    assert type(bar).__name__ == "RolloutProgressBar"
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (4, 4)  # 8 steps / 2 per rollout
    out = capsys.readouterr().out
    assert "rollouts" in out and "perf/s_per_rollout" in out and "Epoch" not in out


def test_missing_reward_scorer_is_explained(tmp_path):
    run = cli.main(demo_args(tmp_path), run=False)
    run.trainer.callbacks = [cb for cb in run.trainer.callbacks if not isinstance(cb, RewardScorer)]
    with pytest.raises(ValueError, match="GRPO needs exactly one RewardScorer"):
        run.trainer.fit(run.model, datamodule=run.datamodule)


def test_lora_fit_with_kl_and_ratio_norm(tmp_path):
    run = cli.main(demo_args(tmp_path, "--model.beta", "0.05", "--model.ratio_norm", "true", "--model.inner_epochs", "2",
                         "--model.policy.init_args.lora_rank", "4",
                         "--model.policy.init_args.lora_targets", "[inp, mid1, mid2, out]"), run=False)
    before = {n: p.detach().clone() for n, p in run.model.policy.named_trainable_parameters()}
    frozen = {n: p.detach().clone() for n, p in run.model.policy.named_parameters() if not p.requires_grad}
    run.trainer.fit(run.model, datamodule=run.datamodule)
    params = dict(run.model.policy.named_parameters())
    assert all("lora_" in n for n in before) and any(not torch.equal(before[n], params[n]) for n in before)
    assert all(torch.equal(frozen[n], params[n]) for n in frozen)  # base weights untouched
    metrics = run.trainer.callback_metrics
    assert metrics["train/kl"] > 0 and math.isfinite(metrics["train/kl"])  # adapters moved away from the reference
    assert metrics["train/ratio_drift_first"] == 0


def test_train_fraction_picks_a_sorted_random_subset(tmp_path):
    module = _module(tmp_path, sampler=Sampler("precise", num_steps=10), train_fraction=0.5)
    picks = []
    for rollout in range(20):
        module.rollouts = rollout
        picks.append(module.trained_steps(list(range(9))))
        assert module.trained_steps(list(range(9))) == picks[-1]  # a function of (seed, rollout): same on every rank
    assert all(len(p) == 4 and p == sorted(p) and set(p) <= set(range(9)) for p in picks)  # int(0.5 x 9)
    assert len({tuple(p) for p in picks}) > 1
    assert _module(tmp_path).trained_steps([0, 1, 2]) == [0, 1, 2]
    # DanceGRPO's FLUX script: 16 steps, the last ignored, --timestep_fraction 0.6 -> int(15 x 0.6) = 9 trained
    # (finetune_flux_grpo.sh:45,55-56, train_grpo_flux.py:570)
    dance = _module(tmp_path, sampler=Sampler("dance_sde", num_steps=16), train_fraction=0.6)
    assert len(dance.trained_steps(list(range(15)))) == 9


def test_resume_from_checkpoint_continues_where_it_stopped(tmp_path):
    """With Precise-2M: the previous x0_hat lives in the iteration's trajectories, not in the resume state."""
    rule = ("--model.sampler.init_args.rule", "precise_2m")
    first = cli.main(demo_args(tmp_path / "a", "--trainer.max_steps", "4", *rule), run=False)
    first.trainer.fit(first.model, datamodule=first.datamodule)
    first.trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = cli.main(demo_args(tmp_path / "b", "--trainer.max_steps", "10", *rule), run=False)
    ema = next(cb for cb in resumed.trainer.callbacks if isinstance(cb, EMA))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=tmp_path / "mid.ckpt")
    assert not [w for w in caught if "not resumable" in str(w.message)]  # the prompt loader saves its position
    assert resumed.trainer.global_step == 10
    assert ema.num_updates == 1  # crossed step 8 once after resuming at step 4; none before it
    opt_state = resumed.trainer.optimizers[0].state_dict()["state"]
    assert all(int(s["step"]) == 10 for s in opt_state.values())  # AdamW continued from its 4 restored steps
    assert resumed.trainer.callback_metrics["train/ratio_drift_first"] == 0


@pytest.mark.parametrize("rule", ["precise", "precise_2m"])
def test_sliding_window_moves_between_rollouts_in_fit(tmp_path, rule):
    """Precise-2M's first stochastic step after an ODE stretch reads the ODE step's x0_hat: the ratio stays 1."""
    run = cli.main(demo_args(tmp_path, "--model.sampler.init_args.rule", rule,
                             "--model.sampler.init_args.sde_window", "[0,3]",
                             "--model.sampler.init_args.window_shift_every", "1",
                             "--model.sampler.init_args.window_stride", "3"), run=False)
    trained = []
    update = run.model.update
    run.model.update = lambda trajectories, *a: trained.append(trajectories[0].sde_steps) or update(trajectories, *a)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert trained == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]  # 10 steps: 9 may be stochastic
    assert run.trainer.callback_metrics["train/ratio_drift_first"] == 0


def test_named_evaluation_readings_are_logged_side_by_side(tmp_path):
    """An ODE eval_sampler and an SDE reading of the same evaluation (same prompts and initial noise, EMA weights):
    eval/reward is what a run without the extra reading logs; eval/sde/* is the second reading."""
    extra = ["--model.extra_eval_samplers", "{sde: {class_path: precise_lightning.sampling.Sampler, "
             "init_args: {rule: precise, eta: 1.5, num_steps: 10}}}"]
    logged = {}
    for name, args in (("both", extra), ("ode", [])):
        run = cli.main(demo_args(tmp_path / name, "--trainer.max_steps", "2", *args), run=False)
        run.trainer.fit(run.model, datamodule=run.datamodule)
        logged[name] = scalars(run_dir(tmp_path / name))
    assert logged["both"]["eval/reward"] == logged["ode"]["eval/reward"]
    assert {"eval/sde/reward", "eval/sde/reward_digit"} <= set(logged["both"]) and "eval/sde/reward" not in logged["ode"]
    assert logged["both"]["eval/sde/reward"] != logged["both"]["eval/reward"]  # another reading of the same weights
    with pytest.raises(ValueError, match="extra_eval_samplers names become eval/<name>/"):
        cli.main(demo_args(tmp_path, "--model.extra_eval_samplers", "{a/b: {class_path: "
                           "precise_lightning.sampling.Sampler}}"), run=False)


@pytest.mark.parametrize("flat", [[2], [0, 1, 2, 3]], ids=["one-flat-micro-batch", "all-flat"])
def test_dropping_zero_advantage_micro_batches_by_hand(tmp_path, flat):
    """One SGD step over 4 micro-batches of 8 whose micro-batches ``flat`` have advantage 0 (beta 0): a flat
    micro-batch adds no gradient, so dropping it only changes the average, from over 4 micro-batches to over the
    kept ones: the step is 4 / kept times as long, with as many fewer forwards; nothing kept: no step at all."""
    deltas, forwards = {}, {}
    for drop in (False, True):
        run = cli.main(demo_args(tmp_path / str(drop), "--trainer.max_steps", "1", "--model.updates_per_rollout", "1",
                                 "--model.micro_batch_size", "8", "--model.max_grad_norm", "null",
                                 "--model.optimizer", "torch.optim.SGD", "--model.optimizer.init_args.lr", "0.5",
                                 "--model.optimizer.init_args.weight_decay", "0",
                                 "--model.drop_zero_advantage", str(drop).lower(), "--model.eval_at_start", "false",
                                 "--trainer.val_check_interval", "1000"), run=False)
        module = run.model
        advantages = module._advantages

        def zeroed(rewards, group_ids, scored):
            adv, flat_count = advantages(rewards, group_ids, scored)
            for m in flat:
                adv[8 * m : 8 * (m + 1)] = 0
            return adv, flat_count

        module._advantages = zeroed
        calls = []
        velocity = module.policy.velocity
        module.policy.velocity = lambda x, t, c: calls.append(torch.is_grad_enabled()) or velocity(x, t, c)
        before = {n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}
        run.trainer.fit(module, datamodule=run.datamodule)
        deltas[drop] = {n: p.detach() - before[n] for n, p in module.policy.named_trainable_parameters()}
        forwards[drop] = sum(calls)  # forwards with grad: the update's
    kept = 4 - len(flat)
    assert forwards == {False: 4 * 9, True: kept * 9}
    scale = max(float(d.abs().max()) for d in deltas[False].values())
    assert scale > 0 or not kept  # all flat: no gradient either way
    for name, delta in deltas[False].items():  # weights - weights before, in float32: a few ulps of the weights
        expected = delta * (4 / kept) if kept else torch.zeros_like(delta)
        torch.testing.assert_close(deltas[True][name], expected, rtol=0, atol=1e-3 * scale)


def test_ckpt_path_last_resumes_the_newest_run_in_its_own_directory(tmp_path):
    """--ckpt_path last: the newest version_*/checkpoints/last.ckpt, logged on into that version (one curve);
    validate logs beside it, never into a new training version; with no checkpoint yet, a fresh start."""
    first = cli.main(["fit", *demo_args(tmp_path, "--trainer.max_steps", "4", "--ckpt_path", "last")])
    assert first.trainer.global_step == 4 and [p.name for p in (tmp_path / "digits_precise").iterdir()] == ["version_0"]
    resumed = cli.main(["fit", *demo_args(tmp_path, "--trainer.max_steps", "8"), "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 8 and resumed.model.rollouts == 4
    cli.main(["validate", *demo_args(tmp_path), "--ckpt_path", "last"])
    cli.main(["validate", *demo_args(tmp_path)])  # the base model
    assert sorted(p.name for p in (tmp_path / "digits_precise").iterdir()) == ["validate", "version_0"]
    logged = scalars(tmp_path / "digits_precise" / "version_0")
    assert len(logged["train/reward"]) == 4  # rollouts 1-2, then 3-4 after the resume: one curve


def test_user_errors_print_one_message_without_a_traceback_and_abbreviations_are_refused(tmp_path, capsys,
                                                                                       monkeypatch):
    """``python cli.py`` (``cli.run``): a check's error is its message alone, exit 2; PRECISE_LIGHTNING_DEBUG=1
    lets it through with its traceback."""
    args = ["fit", *demo_args(tmp_path, "--data.batch_size", "30")]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: batch_size (30) must be a positive multiple of group_size (8): e.g. 32" in err
    assert "Traceback" not in err
    monkeypatch.setenv("PRECISE_LIGHTNING_DEBUG", "1")
    with pytest.raises(ValueError, match="must be a positive multiple of group_size"):
        cli.run(args)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["fit", *demo_args(tmp_path, "--model.clip_rang", "0.1")])  # not taken for --model.clip_range
    err = capsys.readouterr().err.strip().splitlines()  # the error and where the options are, not the usage block
    assert len(err) == 2 and err[0].endswith("fit --help") and err[1] == "error: unrecognized arguments: " \
        "--model.clip_rang 0.1", err
