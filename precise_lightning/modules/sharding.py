"""FSDP2 sharding of a policy's denoiser, applied by ``GRPOModule.configure_model`` under Lightning's
``ModelParallelStrategy``. Text encoders, VAE and reward models stay replicated: they are frozen and small next
to the optimizer state that sharding saves."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from precise_lightning.modules.policy import Policy


def shard_policy(policy: Policy, mesh: DeviceMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype) -> None:
    """``fully_shard`` each block of the denoiser (and of a frozen KL reference copy), then the denoiser itself.

    Parameters are stored sharded in float32 and gathered in ``param_dtype`` for compute; gradients are
    reduce-scattered in ``reduce_dtype``. LoRA adapters and frozen base weights share the blocks' shards.
    """
    policy_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for denoiser in (policy.denoiser, policy.reference_denoiser):
        if denoiser is None or isinstance(denoiser, FSDPModule):
            continue
        blocks = policy.shard_units(denoiser)
        if not blocks:
            raise ValueError(f"{type(policy).__name__}.shard_units found no blocks to shard in its denoiser")
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy_mp)
        fully_shard(denoiser, mesh=mesh, mp_policy=policy_mp)


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP shards over: all ranks, which must all be data parallel (no tensor parallelism here)."""
    if mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"GRPO shards the denoiser with FSDP2 over every rank, but the strategy's mesh has tensor_parallel_size "
            f"{mesh['tensor_parallel'].size()}: set trainer.strategy.init_args.tensor_parallel_size: 1 and "
            "data_parallel_size to the number of processes (devices x num_nodes)"
        )
    return mesh["data_parallel"]

