"""The demo's reward: the probability that a small digit classifier gives the prompted digit."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from precise_lightning.data.digits import cached_state_dict, digit_labels, isolated_rng, load_digits
from precise_lightning.rewards.reward import Reward


def make_classifier() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, 10))


def train_classifier(net: nn.Module, epochs: int, seed: int) -> dict:
    """Cross-entropy on all digits with light pixel noise, so off-manifold samples are not scored by accident."""
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digits()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=g).split(128):
            x = (images[idx] + 0.05 * torch.randn(images[idx].shape, generator=g)).clamp(0, 1)
            loss = nn.functional.cross_entropy(net(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.state_dict()


class DigitClassifierReward(Reward):
    """reward(images [B, 1, 8, 8] in [0, 1], prompts) -> p(prompted digit | image) [B]; trained once, cached."""

    def __init__(self, epochs: int = 40, seed: int = 0, cache_dir: str | None = None) -> None:
        super().__init__()
        config = dict(epochs=epochs, seed=seed, version=2)
        with isolated_rng(seed):
            self.net = make_classifier()
            train = partial(train_classifier, self.net, epochs, seed)
            self.net.load_state_dict(cached_state_dict(cache_dir, "digits-classifier", config, train))
        self.net.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        labels = digit_labels(prompts, images.device)
        probs = self.net(images.float()).softmax(dim=1)
        return probs.gather(1, labels[:, None]).squeeze(1)
