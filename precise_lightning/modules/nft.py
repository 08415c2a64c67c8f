"""DiffusionNFT (arXiv 2509.16117) as the objective of a run: the rollouts, rewards, advantages, evaluation,
checkpoints and scale of :class:`~precise_lightning.modules.GRPOModule`, with the PPO update replaced by NFT's
flow-matching update on the rollouts' final latents (``model.objective``). Its rollouts come from the old (sampling)
policy, which follows the trained one after every iteration (NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from precise_lightning.modules.checks import update_groups
from precise_lightning.modules.nft_losses import nft_loss, old_policy_decay
from precise_lightning.policies.base import slice_cond
from precise_lightning.sampling import Trajectory

STATS = ("policy_loss", "kl", "old_deviation")


class DiffusionNFT:
    """NFT's update: at ``int(timestep_fraction x N)`` of the sampler's N times per sample (a random order per
    sample, ``train_nft_sd3.py:808-815``), the rollout's final latents are noised afresh and the trained velocity is
    fitted by :func:`~precise_lightning.modules.nft_losses.nft_loss` around the old policy's.

    Args:
        beta: how far the implicit positive policy steps from the old one (paper eq. 8; 1.0 its SD3.5 PickScore
            recipe, 0.1 its OCR one).
        kl_weight: weight of ``mean((v - v_ref)^2)`` to the reference model (its ``train.beta``, 1e-4; 0 skips the
            reference forward).
        decay_flat, decay_rate, decay_ceiling: how closely the old policy follows the trained one, ``old <- d old +
            (1 - d) new`` after each iteration with ``d = min(max(steps - flat, 0) x rate, ceiling)`` over optimizer
            steps (:func:`~precise_lightning.modules.nft_losses.old_policy_decay`; its ``decay_type`` 1: 0, 0.001,
            0.5, the default; type 2: 75, 0.0075, 0.999).
        timestep_fraction: share of the sampler's times trained per sample (its 0.99: 9 of 10).
    """

    def __init__(self, beta: float = 1.0, kl_weight: float = 0.0001, decay_flat: int = 0, decay_rate: float = 0.001,
                 decay_ceiling: float = 0.5, timestep_fraction: float = 0.99) -> None:
        if beta <= 0 or kl_weight < 0 or decay_flat < 0 or decay_rate < 0 or not 0 <= decay_ceiling < 1:
            raise ValueError(f"model.objective (DiffusionNFT): need beta > 0, kl_weight >= 0, decay_flat >= 0, "
                             f"decay_rate >= 0 and 0 <= decay_ceiling < 1, got {beta}, {kl_weight}, {decay_flat}, "
                             f"{decay_rate}, {decay_ceiling}")
        if not 0 < timestep_fraction <= 1:
            raise ValueError(f"model.objective.init_args.timestep_fraction must be in (0, 1], got {timestep_fraction}")
        self.beta, self.kl_weight, self.timestep_fraction = beta, kl_weight, timestep_fraction
        self.decay = (decay_flat, decay_rate, decay_ceiling)
        self.old: dict[str, Tensor] = {}  # the old policy's trainable weights, laid out as the trained ones

    # ---- the old (sampling) policy ----------------------------------------------------------------------------
    def _pairs(self, module: LightningModule) -> Iterator[tuple[Tensor, Tensor]]:
        for sub in module.policy.modules():
            if isinstance(sub, FSDPModule):
                sub.reshard()  # FSDP2 leaves the root's weights gathered after a forward without backward
        params = dict(module.policy.named_trainable_parameters())
        if set(self.old) != set(params):  # the first rollout: the old policy starts as the trained one
            self.old = {n: p.detach().clone() for n, p in params.items()}
        return ((p, self.old[n]) for n, p in params.items())

    @contextmanager
    @torch.no_grad()
    def old_weights(self, module: LightningModule) -> Iterator[None]:
        """Within this context the policy holds the old policy's weights (the trained ones are kept aside)."""
        kept = []
        for p, old in self._pairs(module):
            kept.append(p.detach().clone())
            p.copy_(old)
        try:
            yield
        finally:
            for (p, _), weights in zip(self._pairs(module), kept):
                p.copy_(weights)

    @torch.no_grad()
    def follow(self, module: LightningModule, optimizer_steps: int) -> float:
        """Pull the old policy towards the trained one after an iteration, ``optimizer_steps`` into the run (the
        official code's global_step); returns the decay used."""
        d = old_policy_decay(optimizer_steps, *self.decay)
        for p, old in self._pairs(module):
            old.mul_(d).add_(p.detach(), alpha=1 - d)
        return d

    def state_dict(self) -> dict[str, Any]:
        return {"old": {n: t.full_tensor() if hasattr(t, "full_tensor") else t for n, t in self.old.items()}}

    def load_state_dict(self, state: dict[str, Any], module: LightningModule) -> None:
        params = dict(module.policy.named_trainable_parameters())
        self.old = {}
        for name, value in state["old"].items():
            p = params[name]
            if hasattr(p, "device_mesh"):  # sharded (FSDP2): this rank's shard of the whole tensor
                from torch.distributed.tensor import distribute_tensor

                self.old[name] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            else:
                self.old[name] = value.to(p.device, p.dtype)

    # ---- the update -------------------------------------------------------------------------------------------
    def update(self, module: LightningModule, trajectories: list[Trajectory], cond: Any, slices: list[slice],
               advantages: Tensor, sample_ids: Tensor) -> dict[str, list[Tensor]]:
        """NFT's optimizer steps over one rollout (``updates_per_rollout`` of them, each over its micro-batches and
        their trained times), as :meth:`GRPOModule.update` does PPO's."""
        policy, times = module.policy, module.sampler.timesteps
        count = max(1, int(module.sampler.num_steps * self.timestep_fraction))
        # Per sample, generators keyed by its id (the module's own: the same on any split over ranks and restarts):
        # a random order of the sampler's times (t = 1 included, 0 not), and fresh noise at each trained time.
        order = torch.stack([torch.randperm(module.sampler.num_steps, generator=g, device=g.device)[:count].cpu()
                             for g in module._generators(sample_ids, 3).generators])
        noise_of = module._generators(sample_ids, 4)
        stats: dict[str, list[Tensor]] = {k: [] for k in (*STATS, "grad_norm")}
        opt = module.optimizers()
        groups = [g for _ in range(module.ppo.inner_epochs) for g in update_groups(len(slices),
                                                                                   module.ppo.updates_per_rollout)]
        for group in groups:
            last = (group[-1], count - 1)
            for m in group:
                s, traj = slices[m], trajectories[m]
                x0, cond_m, adv = traj.latents[-1].float(), slice_cond(cond, slices[m]), advantages[s]
                ts = [times[order[s, j]].to(x0) for j in range(count)]  # each [b]
                x_ts = [(1 - t.view(-1, *[1] * (x0.ndim - 1))) * x0 + t.view(-1, *[1] * (x0.ndim - 1))
                        * noise_of[s].randn(x0.shape, x0.dtype, x0.device) for t in ts]
                with torch.no_grad(), self.old_weights(module):  # one swap of weights per micro-batch
                    v_olds = [policy.velocity(x_t, t, cond_m) for x_t, t in zip(x_ts, ts)]
                for j, (x_t, t, v_old) in enumerate(zip(x_ts, ts, v_olds)):
                    v_ref = None
                    if self.kl_weight > 0:
                        with torch.no_grad(), policy.reference():
                            v_ref = policy.velocity(x_t, t, cond_m)
                    out = nft_loss(policy.velocity(x_t, t, cond_m), v_old, x0, x_t, t, adv, self.beta,
                                   module.hparams.adv_clip_max, v_ref, self.kl_weight)
                    with module._grad_sync((m, j) == last):
                        module.manual_backward(out.loss / (len(group) * count))
                    for key in STATS:
                        stats[key].append(getattr(out, key))
            opt.step()  # clipped in on_before_optimizer_step
            stats["grad_norm"].append(module._grad_norm)
            opt.zero_grad(set_to_none=True)
        return stats
