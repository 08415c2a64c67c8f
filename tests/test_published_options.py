"""Training options that reproduce a published loop: the EMA's blend count and timing, one initial noise per group
(DanceGRPO), 16-mixed with loss scaling (Flow-GRPO)."""

import types

import pytest
import torch

import cli
from conftest import demo_args
from precise_lightning.callbacks import EMA


@pytest.mark.parametrize("micro_batches", [8, 2], ids=["klein", "sd35"])
def test_ema_blends_as_often_and_when_the_published_loop_does(micro_batches):
    """The published loops (Precise rl_trainer.py:964-965, Flow-GRPO train_sd3.py:954-955) call ``ema.step(params,
    global_step)`` after every micro-batch, and ema.py blends when ``(global_step + 1) % 8 == 0`` with
    d = min((1 + k) / (10 + k), 0.9): a qualifying step's weights are blended once per micro-batch until the next
    step. Klein: 8 micro-batches per optimizer step (config/flux2_klein.py:62-75), SD3.5: 2 (config/grpo.py:118-125).
    """
    weight = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([weight], lr=1.0)
    ema = EMA(decay=0.9, every_n_steps=8, blends_per_step=micro_batches)
    logged = []
    module = types.SimpleNamespace(policy=types.SimpleNamespace(named_trainable_parameters=lambda: [("w", weight)],
                                                                modules=lambda: []),
                                   log=lambda key, value: logged.append(value))
    trainer = types.SimpleNamespace(global_step=0, optimizers=[opt])
    ema.on_fit_start(trainer, module)
    ema.on_train_start(trainer, module)
    published, global_step, published_w = torch.zeros(1), 0, 0.0
    for epoch in range(12):  # two optimizer steps per epoch, as both recipes
        for i in range(2 * micro_batches):
            if (i + 1) % micro_batches == 0:  # the accumulation group's last micro-batch steps the optimizer
                weight.grad = -torch.ones(1) * (global_step + 1)  # the weight moves differently at every step
                opt.step()  # our blend runs in the optimizer's post-hook
                trainer.global_step += 1
                global_step += 1
                published_w += global_step
            if (global_step + 1) % 8 == 0:  # ema.py step(), transcribed
                d = min((1 + global_step) / (10 + global_step), 0.9)
                published = published + (1 - d) * (published_w - published)
        torch.testing.assert_close(ema.shadow["w"], published, rtol=1e-6, atol=0)  # at every rollout's end
    ema.on_train_end(trainer, module)
    assert ema.num_updates == 3  # steps 7, 15, 23
    assert logged == pytest.approx([(8 / 17) ** micro_batches, (16 / 25) ** micro_batches, (24 / 33) ** micro_batches])
    weight.grad = torch.ones(1)
    opt.step()  # hooks are removed when training ends
    assert ema.num_updates == 3


def test_same_noise_per_group_starts_a_group_from_one_noise(tmp_path):
    """DanceGRPO's --init_same_noise (train_grpo_flux.py:333-350): one initial noise per prompt's group; the later
    steps' noise still differs per image, so the group's images differ."""
    run = cli.main(demo_args(tmp_path, "--model.same_noise_per_group", "true", "--trainer.max_steps", "2"), run=False)
    seen = []
    rollout = run.model.rollout

    def recording(cond, noise, *args, **kwargs):
        trajectories, images = rollout(cond, noise, *args, **kwargs)
        seen.append((noise, torch.cat([t.latents[-1] for t in trajectories])))
        return trajectories, images

    run.model.rollout = recording
    groups = []
    on_batch = run.model.training_step
    run.model.training_step = lambda batch, *a: groups.append(batch["group_ids"]) or on_batch(batch, *a)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    (noise, final), group_ids = seen[0], groups[0]
    for g in group_ids.unique():
        rows = (group_ids == g).nonzero().flatten()
        assert len(rows) > 1 and all(torch.equal(noise[rows[0]], noise[r]) for r in rows)
        assert not torch.equal(final[rows[0]], final[rows[1]])
    other = (group_ids != group_ids[0]).nonzero()[0]
    assert not torch.equal(noise[0], noise[other].squeeze(0))  # another group, another noise


FP16_MIXED = """
trainer:
  precision: null
  plugins:
    - class_path: lightning.pytorch.plugins.precision.MixedPrecision
      init_args:
        precision: 16-mixed
        device: cpu
        scaler: {class_path: torch.amp.GradScaler, init_args: {device: cpu}}
"""


NFT = ["--model.objective", "precise_lightning.modules.nft.DiffusionNFT", "--model.sampler.init_args.rule", "ode"]


@pytest.mark.parametrize("objective", [[], NFT], ids=["ppo", "nft"])
def test_16_mixed_scales_the_loss_and_clips_unscaled_gradients(tmp_path, objective):
    """16-mixed (Flow-GRPO's and DiffusionNFT's mixed_precision, config/base.py:21 / :23), on CPU through an explicit
    plugin (Lightning turns a plain 16-mixed into bf16 there): the loss is scaled by 65536, and the gradient norm
    that is logged and clipped is the unscaled one, as in a float32 run of the same rollout."""
    (tmp_path / "fp16.yaml").write_text(FP16_MIXED)
    norms = {}
    for name, extra in {"fp16": ["--config", str(tmp_path / "fp16.yaml")], "fp32": []}.items():
        run = cli.main(demo_args(tmp_path / name, *extra, *objective, "--trainer.max_steps", "2"), run=False)
        before = {n: p.detach().clone() for n, p in run.model.policy.named_trainable_parameters()}
        run.trainer.fit(run.model, datamodule=run.datamodule)
        norms[name] = float(run.trainer.callback_metrics["train/grad_norm"])
        assert any(not torch.equal(before[n], p) for n, p in run.model.policy.named_trainable_parameters())
        if name == "fp16":
            assert run.trainer.precision_plugin.scaler is not None
            assert float(run.trainer.callback_metrics["train/grad_scale"]) == 65536.0
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=0.05)


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_lora_init_draws_a_as_the_published_trainers_do(init):
    """B starts at 0 either way (the policy starts as the base model); A is Gaussian with std 1 / rank (peft's
    "gaussian": Flow-GRPO, Precise) or Kaiming-uniform within +-1 / sqrt(fan_in) (peft's default: DanceGRPO)."""
    from precise_lightning.policies import DigitsPolicy

    torch.manual_seed(0)
    policy = DigitsPolicy(hidden=64, pretrain_steps=0, lora_rank=8, lora_targets=["mid1"], lora_init=init)
    params = dict(policy.named_trainable_parameters())
    a = next(p for n, p in params.items() if "lora_A" in n)
    b = next(p for n, p in params.items() if "lora_B" in n)
    assert torch.equal(b, torch.zeros_like(b))
    if init == "gaussian":
        assert abs(a.std().item() - 1 / 8) < 0.01
    else:
        bound = 1 / a.shape[1] ** 0.5
        assert a.abs().max() <= bound and a.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)
    with pytest.raises(ValueError, match="lora_init must be"):
        DigitsPolicy(hidden=64, pretrain_steps=0, lora_rank=8, lora_targets=["mid1"], lora_init="xavier")
