"""What the diffusers-backed policies share: loading the stock pipeline, frozen text encoders and VAE, the
resolution check, a cached negative prompt and classifier-free guidance around the transformer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from precise_lightning.hub import Dtype, frozen_dtype, load_pretrained
from precise_lightning.modules.policy import Policy


class PipelinePolicy(Policy):
    """A :class:`Policy` over a diffusers pipeline's components. Subclasses set ``pipeline_class`` and ``frozen``
    (the components that never train) and implement :meth:`encode_prompts`, :meth:`transformer_velocity`,
    :meth:`latent_shape_for` and :meth:`decode`, reusing the pipeline's own methods so that the ODE rollout equals
    the stock pipeline's.

    With ``guidance_scale > 1`` the velocity is ``v_uncond + w (v_cond - v_uncond)`` in rollout and training alike,
    computed in one batched forward (unconditional half first).
    """

    frozen: tuple[str, ...]
    shard_blocks = ("transformer_blocks", "single_transformer_blocks")

    def __init__(
        self,
        model: str,
        revision: str | None,
        resolution: int,
        guidance_scale: float,
        negative_prompt: str,
        text_dtype: Dtype | None,
        gradient_checkpointing: bool,
        lora_rank: int,
        lora_alpha: float | None,
        lora_targets: list[str] | None,
    ) -> None:
        super().__init__(lora_rank, lora_alpha, lora_targets)
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {guidance_scale}")
        name = self.pipeline_class.__name__
        # Frozen parts load straight into their dtype (T5-XXL never passes through float32 in host memory).
        dtypes = {component: frozen_dtype(text_dtype) for component in self.frozen} | {"default": torch.float32}
        pipe = load_pretrained(self.pipeline_class.from_pretrained, model, f"{name} weights",
                               "model.policy.init_args.model", revision=revision, dtype=dtypes)
        self.latent_shape = self.latent_shape_for(pipe, resolution)
        for component in self.frozen:  # registered here so that Lightning moves them with the policy
            setattr(self, component, getattr(pipe, component).eval().requires_grad_(False))
        self.pipeline = pipe  # not a module: its own methods act on the components above
        self.model = model
        self.guidance_scale, self.negative_prompt = guidance_scale, negative_prompt
        self._negative: dict[str, Tensor] | None = None
        if gradient_checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        self.attach_denoiser(pipe.transformer)

    def signature(self) -> dict[str, Any]:
        return super().signature() | {"model": self.model}

    def train(self, mode: bool = True) -> PipelinePolicy:
        """Frozen parts stay in eval mode: T5's dropout (rate 0.1 in its config) would otherwise make prompt
        embeddings random whenever the module is put in training mode."""
        super().train(mode)
        for component in self.frozen:
            getattr(self, component).eval()
        return self

    def latent_shape_for(self, pipe: Any, resolution: int) -> tuple[int, ...]:
        """Latent shape of one image at ``resolution``; raises if the resolution does not fit the latent grid."""
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """The pipeline's prompt encoding, as a dict of [B, ...] tensors."""
        raise NotImplementedError

    def transformer_velocity(self, net: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The transformer's velocity at latents x [B, ...] and times t [B] in [0, 1], as the pipeline calls it."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """The prompts' encoding and, with guidance, the negative prompt's (computed once per device) as ``neg_*``."""
        cond = self.encode_prompts(prompts)
        if self.guidance_scale > 1:
            if self._negative is None or next(iter(self._negative.values())).device != self.device:
                self._negative = self.encode_prompts([self.negative_prompt])
            cond |= {f"neg_{k}": v.expand(len(prompts), *v.shape[1:]) for k, v in self._negative.items()}
        return cond

    def velocity(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        t = t.reshape(-1).expand(len(x))
        if self.guidance_scale == 1:
            return self.transformer_velocity(self.active_denoiser, x, t, cond).to(x.dtype)
        both = {k: torch.cat([cond[f"neg_{k}"], cond[k]]) for k in cond if not k.startswith("neg_")}
        v = self.transformer_velocity(self.active_denoiser, torch.cat([x, x]), torch.cat([t, t]), both).float()
        v_uncond, v_cond = v.chunk(2)
        return (v_uncond + self.guidance_scale * (v_cond - v_uncond)).to(x.dtype)


def denoiser_dtype(net: nn.Module) -> torch.dtype:
    return next(net.parameters()).dtype
