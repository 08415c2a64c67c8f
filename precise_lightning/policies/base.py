"""The policy contract every model implements, and the LoRA / reference-model handling they share."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import save_torch_state_dict
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map

from precise_lightning.sampling import LinearGrid, TimeGrid


def slice_cond(cond: Any, index: slice | Tensor) -> Any:
    """Select batch rows of a conditioning (a tensor, or a dict / tuple of tensors)."""
    return tree_map(lambda c: c[index] if isinstance(c, Tensor) else c, cond)


class Policy(nn.Module):
    """``encode(prompts) -> cond``, ``velocity(x, t, cond) -> v``, ``decode(latents) -> images in [0, 1]``.

    Subclasses build their network and hand it to :meth:`attach_denoiser`. With ``lora_rank > 0`` only peft LoRA
    adapters train and the reference model is the same network with adapters disabled; with ``lora_rank = 0`` the
    whole denoiser trains and the reference is a frozen copy, made only when a KL penalty asks for it. The adapters
    start as the identity (B = 0) with A drawn as ``lora_init`` says: ``gaussian`` (std 1 / rank: Flow-GRPO's and the
    Precise code's) or ``kaiming`` (peft's default, Kaiming-uniform: DanceGRPO's ``init_lora_weights=True``).
    """

    latent_shape: tuple[int, ...]
    pipeline_class: Any = None  # the diffusers pipeline whose save_lora_weights / load_lora_weights fit this model
    shard_blocks: tuple[str, ...] = ()  # the denoiser's attributes (modules or ModuleLists) FSDP shards one by one

    def __init__(self, lora_rank: int = 0, lora_alpha: float | None = None, lora_targets: list[str] | None = None,
                 lora_init: Literal["gaussian", "kaiming"] = "gaussian"):
        super().__init__()
        if lora_init not in ("gaussian", "kaiming"):
            raise ValueError(f"lora_init must be 'gaussian' or 'kaiming', got {lora_init!r}")
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tuning), got {lora_rank}")
        if lora_rank and not lora_targets:
            raise ValueError("lora_targets must name the modules that get adapters (e.g. ['to_q', 'to_k', 'to_v'])")
        self.lora_rank, self.lora_alpha, self.lora_targets = lora_rank, lora_alpha, lora_targets
        self.lora_init = lora_init
        self.reference_denoiser: nn.Module | None = None
        self._use_reference = False

    @classmethod
    def check_arguments(cls, arguments: dict[str, Any]) -> None:
        """Raise on what the config's ``init_args`` alone show to be wrong; called when the config is parsed, before
        any model loads."""

    def attach_denoiser(self, denoiser: nn.Module) -> None:
        if self.lora_rank:
            denoiser.requires_grad_(False)
            config = LoraConfig(
                r=self.lora_rank,
                lora_alpha=self.lora_alpha or self.lora_rank,
                target_modules=self.lora_targets,
                init_lora_weights="gaussian" if self.lora_init == "gaussian" else True,  # True: peft's Kaiming
                lora_dropout=0.0,  # dropout would make rollout and re-scoring differ (ratio != 1)
            )
            denoiser = get_peft_model(denoiser, config)
        self.denoiser = denoiser

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def shard_units(self, denoiser: nn.Module) -> list[nn.Module]:
        """The modules FSDP2 shards one by one: those named in ``shard_blocks`` (a ModuleList gives its items)."""
        base = denoiser.get_base_model() if self.lora_rank else denoiser
        blocks: list[nn.Module] = []
        for name in self.shard_blocks:
            module = getattr(base, name, None)
            if module is not None:
                blocks.extend(module if isinstance(module, nn.ModuleList) else [module])
        return blocks

    def signature(self) -> dict[str, Any]:
        """What a checkpoint's trainable weights depend on; a resumed run must match it."""
        return {
            "policy": type(self).__name__,
            "lora": (self.lora_rank, self.lora_alpha, sorted(self.lora_targets or [])),
            "trainable": {n: tuple(p.shape) for n, p in self.named_trainable_parameters()},
        }

    def save_lora(self, directory: str | Path, write: bool = True) -> None:
        """The LoRA adapters in diffusers' format with peft's adapter metadata (without it a loader cannot know
        alpha), so that ``pipeline_class.from_pretrained(...).load_lora_weights(directory)`` reproduces the policy.
        Sharded adapters are gathered: every rank calls this, the one with ``write`` writes."""
        if not self.lora_rank:
            raise ValueError("save_lora needs LoRA adapters (lora_rank > 0); a fully fine-tuned transformer is saved "
                             "with its save_pretrained")
        if self.pipeline_class is None:
            raise NotImplementedError(f"{type(self).__name__} has no diffusers pipeline to save LoRA weights for")
        layers = {k.removeprefix("base_model.model."): v.full_tensor() if isinstance(v, DTensor) else v
                  for k, v in get_peft_model_state_dict(self.denoiser).items()}
        if not write:
            return
        self.pipeline_class.save_lora_weights(
            directory, transformer_lora_layers=layers,
            transformer_lora_adapter_metadata=self.denoiser.peft_config["default"].to_dict(),
        )

    def save_trained(self, directory: str | Path, write: bool = True) -> None:
        """What trains, in diffusers' format: the LoRA adapters (:meth:`save_lora`) or, fully fine-tuned, the
        denoiser (``save_pretrained``'s files; load it as the pipeline's ``transformer``). Under FSDP2 every rank
        calls this (the weights are gathered) and the one with ``write`` writes."""
        if self.lora_rank:
            self.save_lora(directory, write)
        elif not isinstance(self.denoiser, FSDPModule):
            if write:
                self.denoiser.save_pretrained(directory)
        else:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0 only
            state = get_model_state_dict(self.denoiser, options=options)
            if write:
                self.denoiser.save_config(directory)
                save_torch_state_dict(state, directory, filename_pattern="diffusion_pytorch_model{suffix}.safetensors")

    def enable_reference(self) -> None:
        """Make the reference model available (a frozen copy for full fine-tuning; free with LoRA)."""
        if not self.lora_rank and self.reference_denoiser is None:
            self.reference_denoiser = copy.deepcopy(self.denoiser).requires_grad_(False)

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Within this context :meth:`velocity` is the reference (base) model's."""
        if self.lora_rank:
            # The tuner's own switch: PeftModel.disable_adapter() also scans every layer's status on each entry.
            self.denoiser.base_model.disable_adapter_layers()
            try:
                yield
            finally:
                self.denoiser.base_model.enable_adapter_layers()
            return
        if self.reference_denoiser is None:
            raise RuntimeError("no reference model: call enable_reference() first (GRPOModule does when beta > 0)")
        self._use_reference = True
        try:
            yield
        finally:
            self._use_reference = False

    @property
    def active_denoiser(self) -> nn.Module:
        return self.reference_denoiser if self._use_reference else self.denoiser

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def default_grid(self) -> TimeGrid:
        """The time grid a sampler without one of its own samples on: uniform in t unless the model says otherwise."""
        return LinearGrid()

    def encode(self, prompts: list[str]) -> Any:
        raise NotImplementedError

    def velocity(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        """v [B, ...] at latents x [B, ...] and time t (0-d or [B])."""
        return self.active_denoiser(x, t, cond)

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError
