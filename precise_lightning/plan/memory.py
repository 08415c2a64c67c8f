"""What one GPU holds for a recipe: weights counted on the built models, trainable state from the trainable
parameters, activations measured by torch's ``MemTracker`` on the models' own forward (and backward) calls.

At real size the models are built on the meta device (shapes, no memory, no download); the tiny recipes load their
tiny models. Each phase runs the policy's own code (``encode``, ``velocity`` with guidance, ``decode``) at the
recipe's micro-batch, so what the tracker sees is what the trainer allocates, with two stated approximations on
the meta device: the compute runs in the autocast dtype throughout (bfloat16 where ``bf16-mixed``), and attention
keeps what a fused (flash) kernel keeps, not the attention matrix the meta device's reference kernel would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from unittest import mock
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.flop_counter import FlopCounterMode

from precise_lightning.policies.base import Policy, slice_cond

GB = 1e9


class FrozenAwareMemTracker(MemTracker):
    """torch's MemTracker, which installs gradient hooks on every parameter of a module it enters and so fails on
    frozen ones (``cannot register a hook on a tensor that doesn't require gradient``): hooks only where all train."""

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        trains = all(p.requires_grad for p in module.parameters())
        return super()._track_module_params_and_buffers(module, install_grad_hooks and trains)


@dataclass
class Measured:
    bytes: int  # peak activations and temporaries (not parameters, buffers or gradients), torch's MemTracker
    flops: int  # torch's FlopCounterMode


def measure(run: Callable[[], Any]) -> Measured:
    """Peak bytes ``run()`` allocates beyond the parameters, buffers and gradients it touches, and its FLOPs, in two
    runs: FlopCounterMode's module hooks keep checkpointed activations alive, which would hide what checkpointing
    saves."""
    flops = FlopCounterMode(display=False)
    with flops:
        run()
    tracker = FrozenAwareMemTracker()
    with tracker:
        run()
    kept = {"Parameter", "Buffer", "Gradient"}
    peak = max((sum(v for k, v in snap.items() if k != "Total" and getattr(k, "value", k) not in kept)
                for snap in tracker.get_tracker_snapshot("peak").values()), default=0)
    return Measured(peak, flops.get_total_flops())


def _fused_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                     dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                     enable_gqa: bool = False) -> Tensor:
    """Scaled dot-product attention that keeps for backward what a flash kernel keeps (output and log-sum-exp)."""
    if attn_mask is not None or enable_gqa or query.device.type != "meta":
        return _sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, scale=scale)[0]


_sdpa = torch.nn.functional.scaled_dot_product_attention


@contextmanager
def fused_attention() -> Iterator[None]:
    """The meta device has no fused attention kernel: its reference kernel would keep the whole attention matrix."""
    torch.nn.functional.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = _sdpa


def measure_encode(policy: Policy, prompts: list[str]) -> tuple[Measured, Any]:
    """The text encoders on one process's prompts (as ``training_step`` encodes them), and the encoding."""
    encoded: dict[str, Any] = {}
    # transformers asks the padding mask's values whether a causal mask can be skipped (Qwen3); meta has no values
    skip = mock.patch("transformers.masking_utils._ignore_causal_mask_sdpa", return_value=False)
    with fused_attention(), skip if policy.device.type == "meta" else nullcontext():
        policy.encode(prompts[:1])  # the negative prompt's encoding is cached: MemTracker counts one call a module
        measured = measure(lambda: encoded.setdefault("cond", policy.encode(prompts)))
    return measured, encoded["cond"]


def measure_denoiser(policy: Policy, cond: Any, micro_batch: int, compute_dtype: torch.dtype,
                     checkpointing: bool) -> dict[str, Any]:
    """One no-grad velocity call (rollout), one with its backward (update) and one VAE decode, on a micro-batch."""
    x = torch.randn(micro_batch, *policy.latent_shape, device=policy.device, dtype=compute_dtype)
    t = torch.tensor(0.5, device=policy.device, dtype=compute_dtype)
    cond = slice_cond(cond, slice(0, micro_batch))
    transformer = getattr(policy, "pipeline", None) and policy.pipeline.transformer
    if transformer is not None:
        transformer.enable_gradient_checkpointing() if checkpointing else transformer.disable_gradient_checkpointing()
    out = {}
    with fused_attention(), _compute_in(policy, compute_dtype):
        with torch.no_grad():
            out["rollout"] = measure(lambda: policy.velocity(x, t, cond))
        images: dict[str, Tensor] = {}
        out["decode"] = measure(lambda: images.setdefault("x", policy.decode(x.float())))
        out["image_floats"] = images["x"][0].numel()  # float32 values of one decoded image
        policy.train()
        out["update"] = measure(lambda: policy.velocity(x, t, cond).float().square().mean().backward())
        policy.eval()
    for p in policy.parameters():
        p.grad = None
    return out


@contextmanager
def _compute_in(policy: Policy, dtype: torch.dtype) -> Iterator[None]:
    """The denoiser in ``dtype`` while measured on the meta device (where autocast does not act); as it was after."""
    net = policy.denoiser
    if policy.device.type != "meta" or dtype == torch.float32:
        yield
        return
    net.to(dtype)
    try:
        yield
    finally:
        net.to(torch.float32)


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


def trajectory_bytes(batch: int, latent_shape: tuple[int, ...], num_steps: int, trained_steps: int,
                     keep_means: bool, multistep: bool) -> int:
    """The stored rollout of one process (float32, ``Trajectory``): latents of every step, log-probs, the means
    (ratio normalisation) and previous x0_hat (multistep rules) of the trained steps, and the decoded 3-channel
    images the rewards score. Computed from the shapes: these are plain tensors, no model runs for them."""
    latent = math.prod(latent_shape)
    floats = (num_steps + 1) * batch * latent + batch * trained_steps
    floats += trained_steps * batch * latent * (int(keep_means) + int(multistep))
    return 4 * floats
