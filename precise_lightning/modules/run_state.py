"""What a GRPO run needs besides weights to continue exactly: seeds derived per rollout and sample, every
process's global RNG states, and a check that a checkpoint fits the configured policy."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
# Lightning's own capture of every RNG (what its checkpoints restore); private: it has no public equivalent.
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states


def derived_seed(*key: int) -> int:
    """A 63-bit seed from integer keys (run seed, rollout, stream, sample id), well mixed by numpy's SeedSequence:
    nearby keys give unrelated streams, and the same keys the same stream on any rank and after any restart."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def rng_states() -> dict[str, Any]:
    """This process's global RNG states (torch, CUDA, numpy, Python) in a form ``torch.load(weights_only=True)``
    reads: numpy's key array becomes a tensor."""
    states = _collect_rng_states(include_cuda=torch.cuda.is_available())
    name, keys, pos, has_gauss, gauss = states["numpy"]
    states["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    name, keys, pos, has_gauss, gauss = states["numpy"]
    states = states | {"numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)}
    if not torch.cuda.is_available():
        states.pop("torch.cuda", None)
    _set_rng_states(states)


def restore_rng_states(per_rank: list[dict[str, Any]], rank: int) -> None:
    """Restore this rank's RNG states from a checkpoint's list of every rank's."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if len(per_rank) != world:
        warnings.warn(f"the checkpoint holds the RNG states of {len(per_rank)} processes and this run has {world}: "
                      "global RNGs are not restored (rollout noise and prompt order do not depend on them)",
                      stacklevel=2)
        return
    set_rng_states(per_rank[rank])


def all_ranks(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order (a collective: every rank must call it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def signature_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between a checkpoint's policy signature and the configured policy's."""
    out = [f"{key}: checkpoint {saved.get(key)!r}, config {current.get(key)!r}"
           for key in sorted(set(saved) | set(current)) if key != "trainable" and saved.get(key) != current.get(key)]
    old, new = saved.get("trainable", {}), current.get("trainable", {})
    changed = [n for n in old.keys() & new.keys() if tuple(old[n]) != tuple(new[n])]
    kinds = {"only in the checkpoint": old.keys() - new.keys(), "only in the config": new.keys() - old.keys(),
             "of another shape": changed}
    for label, names in kinds.items():
        if names:
            out.append(f"{len(names)} trainable tensors {label}, e.g. {sorted(names)[0]}")
    return out
