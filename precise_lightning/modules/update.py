"""The PPO update of a GRPO iteration: re-score the stored rollout with gradients, step by step and micro-batch by
micro-batch, into optimizer steps; GRPO-Guard, the KL to the reference model and the detached diagnostics."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from precise_lightning.modules.checks import update_groups, update_plan
from precise_lightning.modules.guard import NonFiniteGuard
from precise_lightning.modules.losses import cps_log_ratio, grpo_guard_log_ratio, kl_penalty, ppo_policy_loss
from precise_lightning.modules.run_state import derived_seed
from precise_lightning.policies.base import Policy, slice_cond
from precise_lightning.sampling import Sampler, Trajectory

# The detached diagnostics of one (micro-batch, trained step), as _step_loss returns them.
STEP_STATS = (
    "policy_loss", "kl", "clip_fraction", "approx_kl", "ratio_mean", "ratio_min", "ratio_max", "ratio_max_dev",
)


@dataclass(frozen=True)
class PPOSettings:
    """What one rollout's PPO update reads: :class:`~precise_lightning.modules.GRPOModule`'s arguments of the same
    names (its docstring says what each means; its checks have passed)."""

    clip_range: float
    beta: float
    kl_form: str
    kl_eta: float
    log_prob_form: str
    ratio_norm: bool
    train_fraction: float
    inner_epochs: int
    updates_per_rollout: int
    max_grad_norm: float | None
    drop_zero_advantage: bool


class PPOUpdate(LightningModule):
    """Update hooks of :class:`~precise_lightning.modules.GRPOModule`, which sets the attributes below."""

    policy: Policy
    sampler: Sampler  # the training sampler: its steps' times, gains and log-probs
    ppo: PPOSettings
    guard: NonFiniteGuard  # counts skipped optimizer steps
    seed: int  # the run's seed and the rollouts done: with them a rollout's step subset is drawn
    rollouts: int

    def trained_steps(self, sde_steps: list[int]) -> list[int]:
        """The stochastic steps trained this iteration: all, or a random subset of ``int(train_fraction * K)`` of
        the K (DanceGRPO's ``timestep_fraction`` count, train_grpo_flux.py:570; at least one), the same on every
        rank and for every sample: drawn from the rollout's seed."""
        k = max(1, int(self.ppo.train_fraction * len(sde_steps)))
        if k == len(sde_steps):
            return list(sde_steps)
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.rollouts, 1))
        picked = torch.randperm(len(sde_steps), generator=generator)[:k].sort().values
        return [sde_steps[i] for i in picked.tolist()]

    def update(
        self, trajectories: list[Trajectory], cond: Any, slices: list[slice], advantages: Tensor
    ) -> dict[str, list[Tensor]]:
        """PPO updates over the stored rollout; backward per (micro-batch, step) to bound memory.

        Diagnostics stay detached tensors (no host sync per backward) and are reduced once when logged. An
        optimizer step whose gradient norm (of the whole model, under sharding too) is not finite is skipped.
        """
        hp = self.ppo
        opt = self.optimizers()
        steps = self.trained_steps(trajectories[0].sde_steps)
        groups = update_groups(len(slices), hp.updates_per_rollout)
        # Every process logs the same keys in the same order (their reductions are collectives), whatever it ran.
        stats: dict[str, list[Tensor]] = {k: [] for k in (*STEP_STATS, "ratio_drift_first", "dropped_micro_batches",
                                                           "grad_norm")}
        self._v_grad_sq = dict.fromkeys(steps, 0.0)  # per trained step: ||dL/dv||^2, filled by _step_loss's hooks
        first_update = True
        live = [bool((advantages[s] != 0).any()) for s in slices] if hp.drop_zero_advantage else None
        for _ in range(hp.inner_epochs):
            for group in groups:
                plan, scale, dropped = update_plan(group, live, len(steps), self.trainer.strategy)
                stats["dropped_micro_batches"].append(dropped)
                # Nothing kept (every sample of this update, on every process, has advantage 0): no gradient, but
                # the optimizer still steps (weights untouched), so max_steps keeps counting rollouts' updates.
                last = (plan[-1][0], steps[-1]) if plan else None
                for m, weight in plan:
                    traj, cond_m, adv = trajectories[m], slice_cond(cond, slices[m]), advantages[slices[m]]
                    ref_means = self._reference_means(traj, cond_m, steps) if hp.beta > 0 else {}
                    for i in steps:
                        out = self._step_loss(traj, cond_m, adv, i, ref_means.get(i))
                        with self._grad_sync((m, i) == last):
                            self.manual_backward(out.pop("loss") * (scale * weight))
                        if not weight:  # a stand-in that keeps collectives in step: no diagnostics
                            continue
                        for key, value in out.items():
                            stats[key].append(value)
                        if first_update:
                            stats["ratio_drift_first"].append(out["ratio_max_dev"])
                opt.step()  # clipped in on_before_optimizer_step, where 16-mixed's gradients are unscaled
                stats["grad_norm"].append(self._grad_norm)
                opt.zero_grad(set_to_none=True)
                first_update = first_update and not plan  # the ratio is 1 until weights first move
        # Each trained step's share of the signal the loss sends into the network (the gradient w.r.t. the velocity):
        # a step whose |d mean / d v| / std dwarfs the others' shows here as a share near 1 (see the README).
        sq = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device)
                          for v in self._v_grad_sq.values()])
        norms = self.trainer.strategy.reduce(sq, reduce_op="sum").sqrt()  # the whole batch's, over all ranks
        for i, share in zip(self._v_grad_sq, norms / norms.sum().clamp_min(1e-30)):
            stats[f"step_share/step_{i:02d}"] = [share]
        return stats

    def _record_v_grad(self, step: int, grad: Tensor) -> None:
        self._v_grad_sq[step] = self._v_grad_sq[step] + grad.detach().float().pow(2).sum()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the step's gradients (16-mixed: after Lightning unscaled them). A non-finite norm skips the step:
        under 16-mixed the GradScaler skips it and lowers its scale (routine while the scale settles); otherwise
        the gradients are dropped, so AdamW leaves weights and state as they were, and the guard counts it."""
        self._grad_norm = self._clip_gradients()
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.log("train/grad_scale", float(scaler.get_scale()), on_step=True)
        if torch.isfinite(self._grad_norm) or scaler is not None:
            return
        for p in self.policy.trainable_parameters():
            p.grad = None
        self.guard.skip(f"non-finite gradient norm in rollout {self.rollouts}")

    def _clip_gradients(self) -> Tensor:
        """Total gradient norm of the trainable weights (of the whole model: sharded norms are combined), clipped
        to ``max_grad_norm``."""
        params = [p for p in self.policy.trainable_parameters() if p.grad is not None]
        limit = self.ppo.max_grad_norm if self.ppo.max_grad_norm is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def _grad_sync(self, sync: bool) -> Any:
        """All-reduce gradients only on an accumulation group's last backward (Lightning syncs every manual one)."""
        model = self.trainer.model
        return model.no_sync() if not sync and isinstance(model, DistributedDataParallel) else nullcontext()

    @torch.no_grad()
    def _reference_means(self, traj: Trajectory, cond: Any, steps: list[int]) -> dict[int, Tensor]:
        """The reference model's transition means [b, ...] at ``steps`` of one micro-batch, in one switch to it."""
        means = {}
        with self.policy.reference():
            for i in steps:
                x = traj.latents[i]
                v = self.policy.velocity(x, x.new_tensor(self.sampler.step_times(i)[0]), cond)
                means[i] = self.sampler.score(i, x, v, traj.latents[i + 1], _d_prev(traj, i)).mean
        return means

    def _step_loss(
        self, traj: Trajectory, cond: Any, advantages: Tensor, i: int, mean_ref: Tensor | None = None,
    ) -> dict[str, Any]:
        """Loss (with graph) and detached diagnostics of stochastic step ``i`` for one micro-batch; ``mean_ref``
        is the reference model's mean there (needed when ``beta > 0``)."""
        hp = self.ppo
        k = traj.sde_steps.index(i)
        x, x_next = traj.latents[i], traj.latents[i + 1]
        t, t_next = self.sampler.step_times(i)
        v = self.policy.velocity(x, x.new_tensor(t), cond)
        if v.requires_grad and i in self._v_grad_sq:
            v.register_hook(partial(self._record_v_grad, i))
        out = self.sampler.score(i, x, v, x_next, _d_prev(traj, i))
        old_log_prob = traj.log_probs[:, k]
        if hp.ratio_norm:
            log_ratio = grpo_guard_log_ratio(out.log_prob, old_log_prob, out.mean, traj.means[k], out.std)
        elif hp.log_prob_form == "cps":
            log_ratio = cps_log_ratio(out.log_prob, old_log_prob, out.std)
        else:
            log_ratio = out.log_prob - old_log_prob
        ppo = ppo_policy_loss(log_ratio, advantages, hp.clip_range)
        loss = ppo.loss
        gain = self.sampler.gain(i)
        if hp.ratio_norm:
            loss = loss / abs(gain)
        kl = torch.zeros((), device=x.device)
        if hp.beta > 0:
            kl = kl_penalty(out.mean, mean_ref, out.std, hp.kl_form, t, t_next, gain, hp.kl_eta).mean()
            loss = loss + hp.beta * kl
        return {
            "loss": loss,
            "policy_loss": ppo.loss.detach(),
            "kl": kl.detach(),
            "clip_fraction": ppo.clip_fraction,
            "approx_kl": ppo.approx_kl,
            "ratio_mean": ppo.ratio.mean(),
            "ratio_min": ppo.ratio.min(),
            "ratio_max": ppo.ratio.max(),
            "ratio_max_dev": (ppo.ratio - 1).abs().max(),
        }


def _d_prev(traj: Trajectory, step: int) -> Tensor | None:
    """The previous x0_hat a multistep rule's rollout read at ``step`` (None for other rules)."""
    return None if traj.d_prev is None else traj.d_prev[traj.sde_steps.index(step)]
