"""FSDP2 sharding of a policy's denoiser, applied by ``GRPOModule.configure_model`` under Lightning's
``ModelParallelStrategy``. Text encoders, VAE and reward models stay replicated: they are frozen and small next
to the optimizer state that sharding saves."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from precise_lightning.policies.base import Policy


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



class ShardedStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) whose sharded checkpoints are written into a temporary directory
    beside the target and swapped in once every process has written its shards: Lightning writes into the existing
    directory, so a kill during a save left a mix of old and new shards. A kill during the swap itself leaves the
    previous checkpoint whole as ``.<name>.old``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp, old = path.parent / f".{path.name}.tmp", path.parent / f".{path.name}.old"
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)  # what a killed save left
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()  # every shard is on disk
        if self.global_rank == 0:
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier()
