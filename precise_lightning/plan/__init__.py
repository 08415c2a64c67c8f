"""``python -m precise_lightning.plan --config configs/sd35_precise.yaml --devices 8 --gpu-memory-gb 80``: what one
GPU holds for a recipe, whether it fits, what to change when it does not, and a rough time per iteration.

The config is parsed and checked by the trainer's own command line (``cli.py``'s checks, overrides included); the
models are the recipe's own classes, built on the meta device at their published sizes when their weights are not
on this machine (``random_weights``), so a plan needs no GPU, no download and no memory to speak of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jsonargparse.typing import import_object
from torch import nn

from precise_lightning.cli import GRPOCLI, main
from precise_lightning.cli_checks import is_sharded
from precise_lightning.hub import resolve
from precise_lightning.plan.memory import GB, measure_denoiser, measure_encode, parameter_bytes, trajectory_bytes
from precise_lightning.plan.rewards import reward_parameters
from precise_lightning.policies.base import Policy
from precise_lightning.policies.pipeline import PipelinePolicy
from precise_lightning.sampling import Sampler
from precise_lightning.sampling.rules import MULTISTEP

USABLE = 0.9  # of a GPU's memory: the CUDA context, NCCL buffers and the allocator's fragmentation take the rest
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, golden hour"


class _ConfigOnly(GRPOCLI):
    """The trainer's parser and checks, no instantiation and no run."""

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


@dataclass
class Recipe:
    """What a plan reads from a parsed config."""

    name: str
    config: Any  # the ``fit`` namespace

    @property
    def sharded(self) -> bool:
        return is_sharded(self.config.trainer.strategy)

    @property
    def compute_dtype(self) -> torch.dtype:
        precision = str(self.config.trainer.precision)
        if precision.startswith("bf16"):
            return torch.bfloat16
        return torch.float16 if precision in ("16", "16-mixed") else torch.float32


def parse(config_args: list[str]) -> Recipe:
    cli = main(["fit", *config_args], cli_class=_ConfigOnly)
    name = getattr(getattr(cli.config.fit.trainer.logger, "init_args", None), "name", None) or "run"
    return Recipe(name, cli.config.fit)


def build_policy(recipe: Recipe) -> Policy:
    """The recipe's policy: loaded when its weights are on this machine (the tiny models), else its published
    architecture on the meta device, with the dtypes the run's accelerator gives the frozen parts."""
    spec = recipe.config.model.policy
    cls = import_object(spec.class_path)
    init = dict(vars(spec.init_args))
    if not issubclass(cls, PipelinePolicy):
        return cls(**init)
    if init.get("text_dtype") is None and recipe.config.trainer.accelerator != "cpu":
        init["text_dtype"] = "bfloat16"  # frozen_dtype's default on a GPU machine (the plan may run without one)
    init["model"] = init.get("model") or cls.hub_id
    if init.get("random_weights") or not Path(resolve(init["model"])).expanduser().exists():
        init["random_weights"] = True
        with torch.device("meta"):
            return cls(**init)
    return cls(**init)


def _sampler(recipe: Recipe, policy: Policy) -> Sampler:
    spec = recipe.config.model.sampler
    if spec is None:
        return Sampler().for_policy(policy)
    init = dict(vars(spec.init_args))
    grid = init.get("grid")
    if grid is not None and hasattr(grid, "class_path"):  # a grid of the config's own (FLUX.1's shifted linspace)
        init["grid"] = import_object(grid.class_path)(**vars(grid.init_args))
    return import_object(spec.class_path)(**init).for_policy(policy)


def _largest_unit(policy: Policy) -> int:
    units = policy.shard_units(policy.denoiser)
    return max((sum(p.numel() for p in u.parameters()) for u in units), default=0)


def plan(config_args: list[str], devices: int, gpu_memory_gb: float, tflops: float = 400.0) -> dict[str, Any]:
    """The plan of one recipe on ``devices`` GPUs of ``gpu_memory_gb`` each (see the module docstring)."""
    recipe = parse(config_args)
    cfg = recipe.config
    policy = build_policy(recipe).eval()
    sampler = _sampler(recipe, policy)
    batch, micro = cfg.data.batch_size, cfg.model.micro_batch_size or cfg.data.batch_size
    trained = math.ceil(cfg.model.train_fraction * len(sampler.sde_steps))
    processes = devices * (cfg.trainer.num_nodes or 1)
    shard = processes if recipe.sharded else 1
    lora = getattr(policy, "lora_rank", 0) > 0
    trainable = sum(p.numel() for p in policy.trainable_parameters())
    text = list(getattr(policy, "text_encoders", []))
    offload = bool(getattr(policy, "offload_text_encoders", False))

    parameters: dict[str, int] = {}
    components: dict[str, float] = {}
    frozen = {n: m for n, m in policy.named_children() if n not in ("denoiser", "reference_denoiser")}
    denoiser_bytes = parameter_bytes(policy.denoiser) - (4 * trainable if lora else 0)
    parameters["denoiser"] = sum(p.numel() for p in policy.denoiser.parameters()) - (trainable if lora else 0)
    components["denoiser weights" + (" (frozen base)" if lora else "")] = denoiser_bytes / shard
    if lora:
        parameters["lora"] = trainable
        components["LoRA adapters"] = 4 * trainable / shard
    if shard > 1:  # one block gathered at a time, in the compute dtype
        components["gathered block (FSDP2)"] = _largest_unit(policy) * recipe.compute_dtype.itemsize
    if policy.reference_denoiser is not None:
        parameters["reference"] = sum(p.numel() for p in policy.reference_denoiser.parameters())
        components["reference copy"] = parameter_bytes(policy.reference_denoiser) / shard
    for name, module in frozen.items():
        if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
            parameters[name] = sum(p.numel() for p in module.parameters())
            if not (offload and module in text):
                components[name] = parameter_bytes(module)
    for section in ("rewards", "metrics"):
        for name, spec in (getattr(cfg.reward, section, None) or {}).items():
            count, nbytes = reward_parameters(spec)
            parameters[f"reward:{name}"] = count
            components[f"reward: {name}"] = nbytes
    components["gradients (float32)"] = 4 * trainable / shard
    components["optimizer state (AdamW, 2 x float32)"] = 8 * trainable / shard
    components["EMA shadow (float32)"] = 4 * trainable / shard
    resident = sum(components.values())

    if offload:  # counted above: measured in place (meta tensors cannot move to host memory)
        policy.offload_text_encoders = False
    encoded, cond = measure_encode(policy, [PROMPT] * batch)
    cond_bytes = sum(v.numel() * v.element_size() for v in cond.values()) if isinstance(cond, dict) else 0
    text_bytes = sum(parameter_bytes(t) for t in text)
    gc = bool(getattr(getattr(policy, "pipeline", None), "transformer", None) is not None
              and policy.pipeline.transformer.is_gradient_checkpointing)
    cache: dict[tuple[int, bool], dict[str, Any]] = {}

    def phases(micro_batch: int, checkpointing: bool, offloaded: bool) -> tuple[float, dict[str, float]]:
        """Peak and per-phase bytes above the resident weights and states, for one setting."""
        if (micro_batch, checkpointing) not in cache:
            cache[micro_batch, checkpointing] = measure_denoiser(policy, cond, micro_batch, recipe.compute_dtype,
                                                                 checkpointing)
        m = cache[micro_batch, checkpointing]
        stored = trajectory_bytes(batch, policy.latent_shape, sampler.num_steps, trained, cfg.model.ratio_norm,
                                  sampler.rule in MULTISTEP) + 4 * batch * m["image_floats"] + cond_bytes
        by_phase = {"encode": encoded.bytes + (text_bytes if offloaded else 0),
                    "rollout": stored + max(m["rollout"].bytes, m["decode"].bytes),
                    "update": stored + m["update"].bytes, "stored": stored}  # gradients: in resident
        base = resident - (text_bytes if offloaded and not offload else 0) + (text_bytes if offload and not offloaded
                                                                                else 0)
        return base + max(by_phase["encode"], by_phase["rollout"], by_phase["update"]), by_phase

    peak, measured = phases(micro, gc, offload)
    usable = USABLE * gpu_memory_gb * GB
    flops = cache[micro, gc]
    calls = batch // micro
    seconds = {
        "encode": encoded.flops / (tflops * 1e12),
        "rollout": (sampler.num_steps * calls * flops["rollout"].flops + calls * flops["decode"].flops)
        / (tflops * 1e12),
        "update": cfg.model.inner_epochs * trained * calls * flops["update"].flops / (tflops * 1e12),
    }
    advice = [] if peak <= usable else _advice(recipe, policy, micro, batch, gc, offload, phases, usable, devices)
    return {
        "recipe": recipe.name,
        "devices": processes,
        "gpu_memory_gb": gpu_memory_gb,
        "usable_gb": round(usable / GB, 2),
        "fits": peak <= usable,
        "peak_gb": round(peak / GB, 2),
        "peak_bytes": int(peak),
        "components": {k: round(v / GB, 3) for k, v in components.items()},
        "phases_gb": {"encode (text encoders' activations)": round(measured["encode"] / GB, 3),
                      "rollout (stored trajectory, images and embeddings + one micro-batch's activations)":
                          round(measured["rollout"] / GB, 3),
                      "update (stored rollout + one micro-batch's forward and backward)":
                          round(measured["update"] / GB, 3)},
        "stored_rollout_gb": round(measured["stored"] / GB, 3),
        "parameters": parameters,
        "trainable_parameters": trainable,
        "micro_batch_size": micro,
        "batch_size": batch,
        "gradient_checkpointing": gc,
        "offload_text_encoders": offload,
        "sharded": recipe.sharded,
        "seconds_per_iteration": {k: round(v, 2) for k, v in seconds.items()} | {
            "total": round(sum(seconds.values()), 2), "at_tflops": tflops},
        "advice": advice,
    }


def _advice(recipe: Recipe, policy: Policy, micro: int, batch: int, gc: bool, offload: bool, phases: Any,
            usable: float, devices: int) -> list[str]:
    """The first single change, in the order the README gives, whose plan fits; else what each gave."""
    has_text = bool(getattr(policy, "text_encoders", None))
    smaller = next((m for m in range(micro // 2, 0, -1)
                    if batch % m == 0 and (batch // m) % recipe.config.model.updates_per_rollout == 0), None)
    candidates = [("--model.policy.init_args.gradient_checkpointing true", micro, True, offload)] if not gc else []
    if has_text and not offload:
        candidates.append(("--model.policy.init_args.offload_text_encoders true", micro, gc, True))
    if smaller:
        candidates.append((f"--model.micro_batch_size {smaller}", smaller, gc, offload))
    tried = []
    for flag, m, checkpointing, offloaded in candidates:
        peak, _ = phases(m, checkpointing, offloaded)
        if peak <= usable:
            return [f"{flag}: peak {peak / GB:.1f} GB"]
        tried.append(f"{flag} alone: peak {peak / GB:.1f} GB, still over")
    m = smaller or micro
    peak, _ = phases(m, True, has_text)
    if peak <= usable:
        return tried + [f"all of them together (micro-batch {m}): peak {peak / GB:.1f} GB"]
    tried.append(f"all of them together (micro-batch {m}): peak {peak / GB:.1f} GB, still over")
    if not recipe.sharded:
        tried.append("--config configs/fsdp.yaml and more devices: FSDP2 divides the denoiser's weights, gradients, "
                     f"optimizer state and EMA by the number of devices (now {devices})")
    else:
        tried.append("more devices: the sharded states divide further; activations and the rollout do not")
    return tried
