"""What the diffusers-backed policies share: loading the stock pipeline, frozen text encoders and VAE, the
resolution check, a cached negative prompt and classifier-free guidance around the transformer."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from precise_lightning.architectures.parts import Size
from precise_lightning.hub import Dtype, frozen_dtype, load_pretrained
from precise_lightning.policies.base import Policy


class PipelinePolicy(Policy):
    """A :class:`Policy` over a diffusers pipeline's components, reusing the pipeline's own methods so that the ODE
    rollout equals the stock pipeline's. A model is one subclass in one file of this package: it sets ``hub_id``
    (the default ``model``), ``pipeline_class`` and ``frozen`` (the components that never train), implements
    :meth:`build` (the published architecture with random weights, tiny or real), :meth:`encode_prompts`,
    :meth:`transformer_velocity`, :meth:`latent_shape_for`, :meth:`decode` and, if its pipeline has its own time
    grid, :meth:`default_grid`; a model with arguments of its own adds them to ``__init__`` and passes the rest
    through (``**kwargs``, which the command line still resolves).

    With ``guidance_scale > 1`` the velocity is ``v_uncond + w (v_cond - v_uncond)`` in rollout and training alike,
    computed in one batched forward (unconditional half first).

    Args:
        model: hub id or local directory of the diffusers pipeline (None: the model's published ``hub_id``).
        revision: hub revision (a commit hash pins the weights).
        resolution: image side in pixels (must fit the latent grid).
        guidance_scale: classifier-free guidance weight, in rollout and training; 1 disables it.
        negative_prompt: the unconditional prompt.
        detach_uncond: with guidance, no gradient through the unconditional half in training (Flow-GRPO's SD3
            update); the velocity, and so the ratio, is unchanged.
        max_sequence_length: prompt tokens of the (last) text encoder; both published trainers use 128.
        text_dtype: dtype of the frozen text encoders (default bfloat16 on GPU machines, float32 on CPU).
        vae_dtype: dtype of the frozen VAE (the published trainers decode in float32).
        gradient_checkpointing: recompute transformer activations in the backward pass (less memory, slower).
        offload_text_encoders: keep the frozen text encoders in host memory and move them to the GPU only while
            prompts are encoded (T5-XXL alone is 9.5 GB in bfloat16); the embeddings are the same.
        random_weights: build the published architecture with random weights instead of loading ``model`` (no
            download): for memory and speed checks at real size (``benchmarks/gpu_check.py``), never for training.
        lora_rank, lora_alpha, lora_targets, lora_init: see :class:`Policy` (0 = full fine-tuning of the transformer).
    """

    hub_id: str
    frozen: tuple[str, ...]
    shard_blocks = ("transformer_blocks", "single_transformer_blocks")

    def __init__(
        self,
        model: str | None = None,
        revision: str | None = None,
        resolution: int = 512,
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
        detach_uncond: bool = False,
        max_sequence_length: int = 128,
        text_dtype: Dtype | None = None,
        vae_dtype: Dtype = "float32",
        gradient_checkpointing: bool = False,
        offload_text_encoders: bool = False,
        random_weights: bool = False,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_targets: list[str] | None = None,
        lora_init: Literal["gaussian", "kaiming"] = "gaussian",
    ) -> None:
        super().__init__(lora_rank, lora_alpha, lora_targets, lora_init)
        model = model or self.hub_id
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {guidance_scale}")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        name = self.pipeline_class.__name__
        # Frozen parts load straight into their dtype (T5-XXL never passes through float32 in host memory).
        dtypes = {c: frozen_dtype(vae_dtype if c == "vae" else text_dtype) for c in self.frozen}
        if random_weights:
            pipe = random_pipeline(partial(self.build, "real"), dtypes)
        else:
            pipe = load_pretrained(self.pipeline_class.from_pretrained, model, f"{name} weights",
                                   "model.policy.init_args.model", revision=revision,
                                   dtype=dtypes | {"default": torch.float32})
        self.latent_shape = self.latent_shape_for(pipe, resolution)
        for component in self.frozen:  # registered here so that Lightning moves them with the policy
            setattr(self, component, getattr(pipe, component).eval().requires_grad_(False))
        self.pipeline = pipe  # not a module: its own methods act on the components above
        self.model = model
        self.guidance_scale, self.negative_prompt = guidance_scale, negative_prompt
        self.detach_uncond, self.max_sequence_length = detach_uncond, max_sequence_length
        self.offload_text_encoders = offload_text_encoders
        self._negative: dict[str, Tensor] | None = None
        if gradient_checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        self.attach_denoiser(pipe.transformer)

    @classmethod
    def check_arguments(cls, arguments: dict[str, Any]) -> None:
        """A ``model`` written as a local path (``/``, ``./``, ``../``, ``~``) that is not there."""
        model = str(arguments.get("model") or "")
        if (not arguments.get("random_weights") and model.startswith(("/", "./", "../", "~"))
                and not Path(model).expanduser().exists()):
            raise FileNotFoundError(f"model.policy.init_args.model {model!r} is a local path that does not exist: "
                                    "give the directory of the diffusers pipeline (or its hub id)")

    def signature(self) -> dict[str, Any]:
        return super().signature() | {"model": self.model}

    def train(self, mode: bool = True) -> PipelinePolicy:
        """Frozen parts stay in eval mode: T5's dropout (rate 0.1 in its config) would otherwise make prompt
        embeddings random whenever the module is put in training mode."""
        super().train(mode)
        for component in self.frozen:
            getattr(self, component).eval()
        return self

    @staticmethod
    def build(size: Size = "tiny", depth: int | None = None) -> Any:
        """The pipeline with random weights: the published architecture (``size="real"``, every layer stack capped
        at ``depth``) or a tiny one of the same classes for tests and CPU runs (``python -m precise_lightning.tiny``)."""
        raise NotImplementedError

    def pipeline_call_arguments(self, latents: Tensor) -> dict[str, Any]:
        """The stock pipeline's ``__call__`` arguments with which it samples this policy's ODE image from the initial
        ``latents`` [B, ...] (as the policy holds them): the tests' parity check, and a user's way to reproduce it."""
        return {"latents": latents, "guidance_scale": self.guidance_scale, "max_sequence_length": self.max_sequence_length}

    def latent_shape_for(self, pipe: Any, resolution: int) -> tuple[int, ...]:
        """Latent shape of one image at ``resolution``; raises if the resolution does not fit the latent grid."""
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """The pipeline's prompt encoding, as a dict of [B, ...] tensors."""
        raise NotImplementedError

    def transformer_velocity(self, net: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The transformer's velocity at latents x [B, ...] and times t [B] in [0, 1], as the pipeline calls it."""
        raise NotImplementedError

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [getattr(self, c) for c in self.frozen if c.startswith("text_encoder")]

    @contextmanager
    def text_encoders_on_device(self) -> Iterator[None]:
        """With ``offload_text_encoders``, the text encoders on the policy's device only inside this context."""
        if not self.offload_text_encoders:
            yield
            return
        for encoder in self.text_encoders:
            encoder.to(self.device)
        try:
            yield
        finally:
            for encoder in self.text_encoders:
                encoder.to("cpu")

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """The prompts' encoding and, with guidance, the negative prompt's (computed once per device) as ``neg_*``."""
        with self.text_encoders_on_device():
            return self._encode(prompts)

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
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
        if self.detach_uncond:
            v_uncond = v_uncond.detach()
        return self.guide(v_uncond, v_cond).to(x.dtype)

    def guide(self, v_uncond: Tensor, v_cond: Tensor) -> Tensor:
        """Classifier-free guidance ``v_uncond + w (v_cond - v_uncond)`` (arXiv 2207.12598 eq. 6, in velocity)."""
        return v_uncond + self.guidance_scale * (v_cond - v_uncond)



class PackedLatentPolicy(PipelinePolicy):
    """A pipeline that packs its latents into 2x2 tokens (FLUX.1, Qwen-Image): the policy keeps them as the VAE's
    ``[C, H/8, W/8]`` grid, packs them for each transformer call and for the stock pipeline's ``latents``."""

    def latent_shape_for(self, pipe: Any, resolution: int) -> tuple[int, ...]:
        factor = pipe.vae_scale_factor * 2
        if resolution % factor:
            raise ValueError(f"resolution ({resolution}) must be a multiple of {factor} (VAE factor x 2x2 packing)")
        side = resolution // pipe.vae_scale_factor
        return (pipe.transformer.config.in_channels // 4, side, side)

    def pipeline_call_arguments(self, latents: Tensor) -> dict[str, Any]:
        b, c, h, w = latents.shape
        return super().pipeline_call_arguments(self.pipeline._pack_latents(latents, b, c, h, w)) | {
            "true_cfg_scale": self.guidance_scale, "negative_prompt": self.negative_prompt}


def denoiser_dtype(net: nn.Module) -> torch.dtype:
    return next(net.parameters()).dtype


def random_pipeline(build: Callable[[], Any], dtypes: dict[str, torch.dtype]) -> Any:
    """``build()`` with the same random weights on every process, initialised on this process's GPU when there is
    one (a CPU initialises T5-XXL's 4.8B weights slowly) or on the meta device when that is the default (plans),
    with the frozen components in their dtypes."""
    device = torch.get_default_device()
    if device.type != "meta":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(0)
        pipe = build()
    for component, dtype in dtypes.items():
        module = getattr(pipe, component)
        if next(module.parameters()).dtype != dtype:  # diffusers warns on every .to(dtype) of its models
            module.to(dtype)
        if dtype == torch.float16:  # as from_pretrained loads them: T5's "wo" stays float32 against fp16 overflow
            keep = getattr(module, "_keep_in_fp32_modules", None) or []
            for name, sub in module.named_modules():
                if any(k in name.split(".") for k in keep):
                    sub.float()
    return pipe


def scaled_decode(vae: nn.Module, image_processor: Any, latents: Tensor) -> Tensor:
    """Images [B, 3, H, W] in [0, 1] from latents [B, C, h, w] through a VAE with a scaling and a shift factor (SD3,
    FLUX.1), as their pipelines decode."""
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pt").float()
