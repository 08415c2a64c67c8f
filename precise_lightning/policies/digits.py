"""The built-in demo policy: a small class-conditional flow-matching MLP on 8x8 digits, pre-trained on first use.

Its conditioning is deliberately weak (during pre-training the label is replaced by a random one with
probability ``label_noise``), so base samples follow the prompt only partly and RL has room to raise alignment.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from precise_lightning.data.digits import cached_state_dict, digit_labels, isolated_rng, load_digits
from precise_lightning.policies.base import Policy


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of t in [0, 1]: [B] -> [B, dim]."""
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(dim // 2, device=t.device, dtype=torch.float32) / (dim // 2))
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class DigitsFlowNet(nn.Module):
    """v(x, t, label) for x [B, 1, 8, 8]: an MLP over the pixels, a time embedding and a label embedding."""

    def __init__(self, hidden: int = 512, embed: int = 64) -> None:
        super().__init__()
        self.embed = embed
        self.label = nn.Embedding(10, embed)
        self.inp = nn.Linear(64 + 2 * embed, hidden)
        self.mid1 = nn.Linear(hidden, hidden)
        self.mid2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 64)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        t = t.reshape(-1).expand(len(x)) if t.numel() == 1 else t.reshape(-1)
        h = torch.cat([x.flatten(1), timestep_embedding(t, self.embed).to(x.dtype), self.label(labels)], dim=1)
        h = self.act(self.inp(h))
        h = h + self.act(self.mid1(h))
        h = h + self.act(self.mid2(h))
        return self.out(h).view_as(x)


def pretrain_flow(net: DigitsFlowNet, steps: int, label_noise: float, seed: int, batch: int = 256) -> dict:
    """Conditional flow matching (x_t = (1-t) x0 + t eps, target eps - x0) on the digits, with label noise."""
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digits()
    data = images * 2 - 1
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g)
        x0, y = data[idx], labels[idx]
        y = torch.where(torch.rand(batch, generator=g) < label_noise, torch.randint(10, (batch,), generator=g), y)
        eps = torch.randn(x0.shape, generator=g)
        t = torch.rand(batch, generator=g)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        loss = ((net(xt, t, y) - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.state_dict()


class DigitsPolicy(Policy):
    """Demo policy. Prompts name a digit ("a handwritten digit 7"); latents are pixels in [-1, 1].

    Args:
        hidden: MLP width.
        label_noise: probability that pre-training sees a random label (weak conditioning: RL headroom).
        pretrain_steps: flow-matching steps of the base model, trained once and cached.
        cache_dir: where base models are cached (default ``$PRECISE_LIGHTNING_CACHE`` or ~/.cache/precise_lightning).
        lora_rank, lora_alpha, lora_targets, lora_init: see :class:`Policy` (0 = full fine-tuning).
    """

    latent_shape = (1, 8, 8)
    shard_blocks = ("inp", "mid1", "mid2", "out")

    def __init__(
        self,
        hidden: int = 512,
        label_noise: float = 0.6,
        pretrain_steps: int = 4000,
        seed: int = 0,
        cache_dir: str | None = None,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_targets: list[str] | None = None,
        lora_init: Literal["gaussian", "kaiming"] = "gaussian",
    ) -> None:
        super().__init__(lora_rank, lora_alpha, lora_targets, lora_init)
        if not 0 <= label_noise <= 1:
            raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
        config = dict(hidden=hidden, label_noise=label_noise, steps=pretrain_steps, seed=seed, version=2)
        with isolated_rng(seed):
            net = DigitsFlowNet(hidden)
            pretrain = partial(pretrain_flow, net, pretrain_steps, label_noise, seed)
            net.load_state_dict(cached_state_dict(cache_dir, "digits-flow", config, pretrain))
        self.attach_denoiser(net)

    def encode(self, prompts: list[str]) -> Tensor:
        return digit_labels(prompts, self.device)

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents.float() + 1) / 2).clamp(0, 1)
