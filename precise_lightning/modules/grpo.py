"""GRPOModule: online GRPO for flow-matching policies with a pluggable stochastic sampler (README, "The training
iteration")."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn

from precise_lightning.callbacks.preemption import Preemption
from precise_lightning.callbacks.progress import RolloutProgressBar
from precise_lightning.callbacks.rewards import RewardScorer, find_reward_scorer
from precise_lightning.checkpoint_io import VerifiedCheckpointIO
from precise_lightning.hub import Dtype
from precise_lightning.modules.checks import check_precision, check_settings, micro_slices
from precise_lightning.modules.evaluation import Evaluation
from precise_lightning.modules.guard import NonFiniteGuard, destroy_process_group_at_exit, non_finite_parts, oom_advice
from precise_lightning.modules.logs import log_iteration
from precise_lightning.modules.losses import flat_groups, group_advantages
from precise_lightning.modules.nft import DiffusionNFT
from precise_lightning.modules.run_state import (
    all_ranks,
    derived_seed,
    restore_rng_states,
    rng_states,
    signature_differences,
)
from precise_lightning.modules.update import PPOSettings, PPOUpdate
from precise_lightning.policies.base import Policy, slice_cond
from precise_lightning.sampling import PerSample, Sampler, Trajectory
from precise_lightning.sharding import data_parallel_mesh, shard_policy



class GRPOModule(Evaluation, PPOUpdate):
    """One training step = rollout (no grad) -> rewards -> group advantages -> PPO-clipped updates (or DiffusionNFT's
    update, ``objective``).

    Args:
        policy: the model (``class_path`` of a :class:`Policy`).
        sampler: the stochastic policy used for rollouts and re-scoring (default: Precise, 10 steps).
        eval_sampler: sampler for evaluation, logged as ``eval/reward``, ``eval/reward_<component>`` and
            ``eval/<metric>`` (default: ODE with the training sampler's grid and step count); ``training``: the
            training sampler itself, so an overlay that changes the sampler changes the evaluation with it (the
            Precise code evaluates each compared sampler with its own SDE).
        extra_eval_samplers: further named readings of the same evaluation (same prompts, same initial noise, EMA
            weights), each logged under ``eval/<name>/`` (e.g. ``{sde: training}``, the training sampler, beside
            an ODE ``eval_sampler``: the two readings can rank samplers differently).
        optimizer: optimizer over the trainable weights (LoRA adapters or the whole denoiser).
        clip_range: PPO ratio clip (1e-4 Flow-GRPO SD3.5; 4e-6 Precise FLUX.2, with mean-reduced log-probs).
        adv_clip_max: advantages are clipped to +-adv_clip_max.
        beta: weight of the KL to the reference model (0 disables it and the reference forward).
        kl_form: which KL ``beta`` weighs: ``exact`` (the two Gaussian transitions' KL), ``flow_grpo`` (over the
            SDE's diffusion coefficient, Flow-GRPO's SD3.5 recipe) or ``precise`` (the squared mean distance, the
            Precise code's); see :func:`precise_lightning.modules.losses.kl_penalty`.
        kl_eta: the noise level of Flow-GRPO's SDE at which ``kl_form: flow_grpo`` takes its strength per unit
            velocity difference (0.7, its SD3.5 recipe's), whatever the training sampler.
        log_prob_form: the log-probability the PPO ratio is taken of: ``gaussian`` (the transition's, every
            published sampler's but CPS's) or ``cps`` (the CPS code's ``-mean((x' - mean)^2)``: ratio
            ``exp(2 std^2 (lp - lp_old))``, see :func:`~precise_lightning.modules.losses.cps_log_ratio`); not with
            ``ratio_norm``, which replaces the ratio by its own.
        std_scope: advantage normaliser, ``group`` (per-prompt std) or ``global`` (std over all ranks' rewards).
        std_unbiased: that std with Bessel's correction (DanceGRPO's) instead of the population one (Flow-GRPO's
            and the Precise code's).
        std_eps: added to that std (1e-4: Flow-GRPO's and the Precise code's; DanceGRPO's 1e-8).
        same_noise_per_group: every image of a prompt's group starts from the same initial noise (DanceGRPO's
            ``--init_same_noise``); the noise of later steps still differs per image.
        train_fraction: share of the sampler's stochastic steps trained per iteration, a random subset if < 1
            (``int(train_fraction * steps)`` of them, DanceGRPO's count).
        inner_epochs: passes over each rollout.
        micro_batch_size: samples per forward / backward (rollout uses the same split, so numerics match).
        updates_per_rollout: optimizer steps per inner epoch; gradients accumulate over steps and micro-batches
            in between (the Precise recipe: 2).
        max_grad_norm: gradient clipping by total norm (None disables it).
        ratio_norm: GRPO-Guard ratio normalisation (README, "Which trained step drives the update").
        drop_zero_advantage: skip micro-batches whose every sample has advantage 0 (flat groups: no signal) in the
            update, and average the loss over the kept ones, as the published trainers drop such samples; saves
            their forward and backward passes (see :func:`~precise_lightning.modules.checks.update_plan`).
        eval_seed: seed of evaluation noise, per prompt, so evaluation images are comparable across runs.
        max_bad_iterations: consecutive iterations whose update was skipped for non-finite values (velocities,
            log-probs, rewards or gradients) after which training stops with an error; checkpoints never hold
            a skipped update, so the last one is the last good state.
        shard_param_dtype: under ``ModelParallelStrategy`` (FSDP2), the dtype the sharded denoiser computes in
            (``bfloat16``: the published recipes); gradients are always reduced in float32.
        eval_at_start: evaluate the starting weights when ``fit`` starts (not on resume), so every eval curve
            has its iteration-0 point.
        objective: another objective in place of the PPO update (:class:`~precise_lightning.modules.nft.DiffusionNFT`),
            on the same rollouts, rewards, advantages and evaluation; the PPO settings (clip_range, ratio_norm,
            log_prob_form, kl_form, train_fraction) do not apply to it, and any sampler collects its rollouts.

    Rollout noise is drawn per sample from a seed derived from the run's seed, the rollout number and the sample
    id, so it is the same however the batch is split over processes and micro-batches, and after a restart.
    """

    def __init__(
        self,
        policy: Policy,
        sampler: Sampler | None = None,
        eval_sampler: Sampler | Literal["training"] | None = None,
        extra_eval_samplers: dict[str, Sampler | Literal["training"]] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        clip_range: float = 1e-4,
        adv_clip_max: float = 5.0,
        beta: float = 0.0,
        kl_form: str = "exact",
        kl_eta: float = 0.7,
        log_prob_form: str = "gaussian",
        std_scope: str = "group",
        std_unbiased: bool = False,
        std_eps: float = 1e-4,
        same_noise_per_group: bool = False,
        train_fraction: float = 1.0,
        inner_epochs: int = 1,
        micro_batch_size: int | None = None,
        updates_per_rollout: int = 1,
        max_grad_norm: float | None = 1.0,
        ratio_norm: bool = False,
        drop_zero_advantage: bool = False,
        eval_seed: int = 0,
        max_bad_iterations: int = 3,
        shard_param_dtype: Dtype = "bfloat16",
        eval_at_start: bool = True,
        objective: DiffusionNFT | None = None,
    ) -> None:
        super().__init__()
        self.sampler = sampler if sampler is not None else Sampler()
        if objective is None and not self.sampler.sde_steps:
            raise ValueError(f"the training sampler must be stochastic, got {self.sampler}: use e.g. rule 'precise'")
        if objective is not None and beta > 0:
            raise ValueError(f"model.beta ({beta}) weighs GRPO's KL; with model.objective DiffusionNFT set its own "
                             "model.objective.init_args.kl_weight and leave model.beta 0")
        self.eval_sampler = self._eval_reading(eval_sampler) or Sampler("ode", num_steps=self.sampler.num_steps,
                                                                         grid=self.sampler.grid)
        self.extra_eval_samplers = {n: self._eval_reading(s) for n, s in (extra_eval_samplers or {}).items()}
        for name in self.extra_eval_samplers:
            if not name or "/" in name or "." in name or name in ("reward", "samples", "prompts"):
                raise ValueError(f"extra_eval_samplers names become eval/<name>/...: {name!r} is not usable, "
                                 "use e.g. 'sde' or 'ode'")
        for s in (self.sampler, self.eval_sampler, *self.extra_eval_samplers.values()):
            s.for_policy(policy)  # a sampler without a grid samples on the policy's own
        if objective is None:  # log-probs are PPO's: NFT trains on the final latents of any sampler's rollouts
            self.sampler.check_trainable()
            self.sampler.warn_if_swamped()
        check_settings(clip_range=clip_range, adv_clip_max=adv_clip_max, beta=beta, kl_form=kl_form, kl_eta=kl_eta,
                       log_prob_form=log_prob_form, ratio_norm=ratio_norm,
                       std_scope=std_scope, std_eps=std_eps, train_fraction=train_fraction, inner_epochs=inner_epochs,
                       micro_batch_size=micro_batch_size, updates_per_rollout=updates_per_rollout,
                       max_grad_norm=max_grad_norm, max_bad_iterations=max_bad_iterations)
        self.save_hyperparameters(ignore=["policy", "sampler", "eval_sampler", "extra_eval_samplers", "optimizer",
                                          "objective"])
        self.policy = policy
        self.optimizer = optimizer
        self.ppo = PPOSettings(clip_range=clip_range, beta=beta, kl_form=kl_form, kl_eta=kl_eta,
                               log_prob_form=log_prob_form, ratio_norm=ratio_norm, train_fraction=train_fraction,
                               inner_epochs=inner_epochs, updates_per_rollout=updates_per_rollout,
                               max_grad_norm=max_grad_norm, drop_zero_advantage=drop_zero_advantage)
        self.automatic_optimization = False
        self.objective = objective
        if beta > 0 or (objective is not None and objective.kl_weight > 0):
            self.policy.enable_reference()
        self.scorer: RewardScorer | None = None
        self.eval_means = nn.ModuleDict()  # logged tag -> MeanMetric of every evaluation reading, made in setup
        self.seed = 0  # the run's seed, agreed by all ranks in setup and restored from checkpoints
        self.rollouts = 0  # iterations done; with the seed it keys each rollout's noise
        self.guard = NonFiniteGuard(max_bad_iterations)
        self._current_phase = ""
        self._v_grad_sq: dict[int, Tensor | float] = {}
        self._grad_norm = torch.zeros(())  # the last optimizer step's, set in on_before_optimizer_step

    def _eval_reading(self, sampler: Sampler | str | None) -> Sampler | None:
        if sampler is None or isinstance(sampler, Sampler):
            return sampler
        if sampler != "training":
            raise ValueError(f"an evaluation sampler is a Sampler or 'training' (the training sampler), got "
                             f"{sampler!r}")
        return self.sampler

    # ---- set-up -----------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.scorer = find_reward_scorer(self.trainer)
        self.eval_means = self.make_eval_means(self.scorer)
        check_precision(self.trainer.precision)  # runs built without the CLI
        if getattr(self.trainer.precision_plugin, "scaler", None) and isinstance(self.trainer.strategy,
                                                                                 ModelParallelStrategy):
            raise ValueError("trainer.precision 16-mixed: the sharded strategy (FSDP2) has no gradient scaler here; "
                             "use bf16-mixed with configs/fsdp.yaml")
        batch_size = getattr(getattr(self.trainer, "datamodule", None), "hparams", {}).get("batch_size")
        if stage == "fit" and batch_size:
            self._micro_slices(batch_size)  # fail before the first rollout, not inside it
        if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own plugin
            self.trainer.strategy.checkpoint_io = VerifiedCheckpointIO()
        if torch.distributed.is_initialized():
            destroy_process_group_at_exit()
        # seed_everything seeds every rank alike; without it rank 0's random seed is shared (checkpoints restore it)
        self.seed = self.trainer.strategy.broadcast(torch.initial_seed() % 2**62)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2 over every rank, one shard unit per denoiser block."""
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            mesh = data_parallel_mesh(self.trainer.strategy.device_mesh)
            shard_policy(self.policy, mesh, getattr(torch, self.hparams.shard_param_dtype), torch.float32)

    # Frozen weights (text encoders, VAE, the base under LoRA, a KL reference copy) are rebuilt from their source at
    # start-up; checkpoints keep what trains (an SD3.5 checkpoint would otherwise carry T5-XXL every time). Sharded
    # checkpoints keep everything: the distributed checkpoint loader reads every key of the model.
    def _frozen_keys(self) -> set[str]:
        trainable = {f"policy.{n}" for n, _ in self.policy.named_trainable_parameters()}
        return {k for k in self.state_dict() if k.startswith("policy.") and k not in trainable}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            frozen = self._frozen_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["grpo"] = {
            "policy": self.policy.signature(),
            "seed": self.seed,
            "rollouts": self.rollouts,
            "guard": self.guard.state_dict(),
            "rng": all_ranks(rng_states()),  # every rank's, each restores its own
        }
        if self.objective is not None:
            checkpoint["grpo"]["objective"] = self.objective.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("grpo", {})
        diff = signature_differences(state["policy"], self.policy.signature()) if "policy" in state else []
        if diff:
            raise ValueError(
                "the checkpoint was made for another policy configuration and cannot be resumed with this one:\n  "
                + "\n  ".join(diff) + "\nuse the config it was trained with, or start afresh"
            )
        if "state_dict" in checkpoint and not isinstance(self.trainer.strategy, ModelParallelStrategy):
            current = self.state_dict()
            for key in self._frozen_keys() - set(checkpoint["state_dict"]):  # strict loading still checks the rest
                checkpoint["state_dict"][key] = current[key]
        if state:
            self.seed, self.rollouts = state["seed"], state["rollouts"]
            self.guard.load_state_dict(state["guard"])
            restore_rng_states(state["rng"], self.global_rank)
            if self.objective is not None and "objective" in state:
                self.objective.load_state_dict(state["objective"], self)

    def configure_callbacks(self) -> list[Callback]:
        """Preemption handling on every run; Lightning's default bar, which counts an epoch's batches, replaced (not
        a custom one) with a rollout counter."""
        callbacks: list[Callback] = [Preemption()]
        bar = self.trainer.progress_bar_callback
        if type(bar) in (TQDMProgressBar, RichProgressBar):
            self.trainer.callbacks.remove(bar)  # Rich is not a TQDMProgressBar, so Lightning would not replace it
            callbacks.append(RolloutProgressBar())
        return callbacks

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.policy.trainable_parameters())

    # ---- rollout ----------------------------------------------------------------------------------------------
    def _micro_slices(self, batch_size: int) -> list[slice]:
        return micro_slices(batch_size, self.hparams.micro_batch_size, self.hparams.updates_per_rollout)

    @torch.no_grad()
    def rollout(
        self, cond: Any, noise: Tensor, slices: list[slice], generator: PerSample | torch.Generator | None,
        on_images: Callable[[slice, Tensor], None] | None = None,
    ) -> tuple[list[Trajectory], Tensor]:
        """Trajectories per micro-batch (the same split the update uses) and the decoded images [B, C, H, W]; each
        micro-batch is decoded as soon as it is sampled and handed to ``on_images(rows, images)`` (scoring)."""
        trajectories, images = [], []
        for s in slices:
            cond_s = slice_cond(cond, s)
            trajectories.append(
                self.sampler.sample(
                    lambda x, t, cond_s=cond_s: self.policy.velocity(x, t, cond_s),
                    noise[s],
                    generator=generator[s] if isinstance(generator, PerSample) else generator,
                    keep_means=self.hparams.ratio_norm,
                    rollout_index=self.rollouts,
                )
            )
            images.append(self.policy.decode(trajectories[-1].latents[-1]))
            if on_images is not None:
                on_images(s, images[-1])
        return trajectories, torch.cat(images)

    def _generators(self, ids: Tensor, stream: int) -> PerSample:
        """One generator per sample, seeded by (run seed, rollout, stream, its id): independent of ranks and
        restarts. Stream 0 is keyed by sample ids (every draw of a rollout), stream 2 by group ids (a group's
        initial noise, alike within the group)."""
        return PerSample([
            torch.Generator(device=self.device).manual_seed(derived_seed(self.seed, self.rollouts, stream, int(i)))
            for i in ids
        ])

    # ---- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        prompts, group_ids = batch["prompts"], batch["group_ids"]
        slices = self._micro_slices(len(prompts))
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        scoring = self.scorer.start_round(prompts, batch.get("metadata"))
        try:
            with self._phase("encode"):
                cond = self.policy.encode(prompts)
            with self._phase("rollout"):  # scoring starts as micro-batches are decoded (RewardScorer.overlap)
                generator = self._generators(batch["sample_ids"], 0)
                first = self._generators(group_ids, 2) if self.hparams.same_noise_per_group else generator
                noise = first.randn((len(prompts), *self.policy.latent_shape), torch.float32, self.device)
                with self.objective.old_weights(self) if self.objective is not None else nullcontext():
                    trajectories, images = self.rollout(cond, noise, slices, generator, on_images=scoring.submit)
            with self._phase("reward"):  # what is left of scoring once sampling is done
                rewards, components = scoring.result()
                scored = ~self.scorer.abstained(components)  # False where a reward gave no score
                advantages, flat_groups = self._advantages(rewards, group_ids, scored)
            self.log("time/reward_inline_s", scoring.inline_seconds, on_step=True)
            stats: dict[str, list[Tensor]] = defaultdict(list)
            if self._finite_rollout(trajectories, rewards[scored]):
                with self._phase("update"):
                    if self.objective is None:
                        stats = self.update(trajectories, cond, slices, advantages)
                    else:
                        stats = self.objective.update(self, trajectories, cond, slices, advantages,
                                                      batch["sample_ids"])
                        self.log("nft/old_decay", self.objective.follow(self, self.trainer.global_step), on_step=True)
        except torch.OutOfMemoryError as err:
            sharded = isinstance(self.trainer.strategy, ModelParallelStrategy)
            micro = self.hparams.micro_batch_size or len(prompts)
            raise torch.OutOfMemoryError(
                oom_advice(self._current_phase, len(prompts), micro, self.policy.lora_rank, sharded)
            ) from err
        finally:
            scoring.close()  # a failed rollout leaves no scoring thread waiting for micro-batches
        self.rollouts += 1
        self.guard.end_iteration()
        log_iteration(self, rewards, components, advantages, flat_groups, stats, time.perf_counter() - start, scored)

    def _advantages(self, rewards: Tensor, group_ids: Tensor, scored: Tensor) -> tuple[Tensor, Tensor]:
        """Group advantages [B] and the number of groups whose rewards are all equal (advantage 0: no signal);
        images without a score (``scored`` False) get advantage 0 and leave their group's statistics."""
        global_std = None
        if self.hparams.std_scope == "global":
            gathered, kept = self.all_gather(rewards).reshape(-1), self.all_gather(scored).reshape(-1)
            global_std = gathered[kept].float().std(unbiased=self.hparams.std_unbiased)
        advantages = group_advantages(
            rewards, group_ids, self.hparams.std_scope, self.hparams.adv_clip_max, self.hparams.std_eps,
            global_std=global_std, unbiased=self.hparams.std_unbiased, valid=scored,
        )
        return advantages, flat_groups(rewards[scored], group_ids[scored])

    def _finite_rollout(self, trajectories: list[Trajectory], rewards: Tensor) -> bool:
        """False (on every rank alike) when any rank's rollout has non-finite latents, log-probs or rewards."""
        bad = non_finite_parts(trajectories, rewards)
        if not self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            return True
        self.guard.skip(f"non-finite {', '.join(bad) or 'values on another rank'} in rollout {self.rollouts}")
        return False

    # ---- timing -----------------------------------------------------------------------------------------------
    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self._current_phase = name
        sync()
        start = time.perf_counter()
        yield
        sync()
        self.log(f"time/{name}_s", time.perf_counter() - start, on_step=True)
