"""A VLM judge behind an OpenAI-compatible chat endpoint (vLLM, sglang) as a reward: UnifiedReward as the Precise
code's ``unifiedreward_v2`` asks it (``precise_sde/rewards/remote.py``): one request per image, the image resized
to 512 x 512 and sent as a JPEG (quality 95) data URL with the published instruction, three 1-5 scores parsed from
the answer, each clamped to [0, 5] and divided by 5, and their weighted mean the reward (0 to 1)."""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from precise_lightning.rewards.jpeg import jpeg_bytes
from precise_lightning.rewards.remote import HttpPool, device_of, uint8_images
from precise_lightning.rewards.reward import Reward

log = logging.getLogger(__name__)

PARTS = ("alignment", "coherence", "style")
INSTRUCTION = (  # the published wording, to the character: the judge was trained on it
    "You are presented with a generated image and its associated text caption. "
    "Provide overall assessments along the following axes (each rated from 1 to 5):\n"
    "- Alignment Score: How well the image matches the caption.\n"
    "- Coherence Score: How logically consistent the image is.\n"
    "- Style Score: How aesthetically appealing the image looks.\n\n"
    "Output your evaluation using the format below:\n\n"
    "Alignment Score (1-5): X\n"
    "Coherence Score (1-5): Y\n"
    "Style Score (1-5): Z\n\n"
    "Your task is provided as follows:\nText Caption: [{prompt}]"
)
_PATTERNS = {part: re.compile(rf"{part.capitalize()} Score \(1-5\):\s*([\d.]+)") for part in PARTS}


def parse_scores(answer: str) -> dict[str, float] | None:
    """The three scores of a judge's answer, each clamped to [0, 5] and divided by 5; None when any is missing."""
    found = {part: pattern.search(answer) for part, pattern in _PATTERNS.items()}
    try:
        return {part: min(max(float(m.group(1)), 0.0), 5.0) / 5.0 for part, m in found.items()}
    except (AttributeError, ValueError):  # no match, or "3." style junk that is not a number
        return None


class UnifiedReward(Reward):
    """``reward(images, prompts) -> ([B] weighted mean of the parts, {alignment, coherence, style: [B]})``.

    Args:
        urls: base URL(s) of the OpenAI-compatible server(s) (``http://host:8080``, with or without ``/v1``);
            requests go to them in turn.
        model: the served model's name (``UnifiedReward`` as published).
        weights: weight of each part (alignment, coherence, style); the reward is their weighted mean. Default:
            equal, as published.
        image_size: images are resized to this square before sending (published: 512).
        max_tokens: the answer's token budget (published: 256); sampling is greedy (temperature 0).
        timeout: seconds to wait for one answer (published: 300).
        retries: further attempts after a connection error, timeout, 429 or 5xx (published: 5), waiting
            ``backoff * 2**k`` s.
        backoff: first wait between attempts, seconds.
        max_in_flight: requests at once, over all URLs (the published client allows 16 per server).
        api_key_env: name of an environment variable holding the server's API key, sent as a bearer token (the
            key itself stays out of configs and logs); None sends ``EMPTY``, as published for a local vLLM or
            sglang server.
    """

    io_bound = True  # waits on a server: scored in the background while sampling goes on
    detail_names = PARTS
    may_abstain = True  # an unusable reply: no score for those images

    def __init__(self, urls: str | list[str], model: str = "UnifiedReward", weights: dict[str, float] | None = None,
                 image_size: int = 512, max_tokens: int = 256, timeout: float = 300.0, retries: int = 5,
                 backoff: float = 1.0, max_in_flight: int = 16, api_key_env: str | None = None) -> None:
        super().__init__()
        weights = dict.fromkeys(PARTS, 1.0) if weights is None else dict(weights)
        if set(weights) - set(PARTS) or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"UnifiedReward.weights: non-negative weights of {list(PARTS)} with a positive sum, "
                             f"got {weights}")
        urls = [urls] if isinstance(urls, str) else list(urls)
        self.pool = HttpPool([u.rstrip("/").removesuffix("/v1") + "/v1/chat/completions" for u in urls], timeout,
                             retries, backoff, max_in_flight, "UnifiedReward")
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ValueError(f"UnifiedReward.api_key_env: the environment variable {api_key_env} is not set")
        self.api_key = os.environ[api_key_env] if api_key_env is not None else "EMPTY"
        self.model, self.image_size, self.max_tokens = model, image_size, max_tokens
        total = sum(weights.values())
        self.weights = {part: weights.get(part, 0.0) / total for part in PARTS}

    def forward(self, images: Tensor | np.ndarray, prompts: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        requests = [self._request(jpeg_bytes(image, 95, self.image_size), prompt)
                    for image, prompt in zip(uint8_images(images), prompts)]
        answers = self.pool.map(requests)
        failed = [(url, text) for url, text, parts in answers if parts is None]
        if failed:
            log.warning("UnifiedReward: %d of %d answers hold no parsable scores (e.g. from %s: %r); their rewards "
                        "are NaN: they get advantage 0 and leave their groups' statistics", len(failed), len(answers), failed[0][0],
                        failed[0][1][:200])
        parts = {part: torch.tensor([p[part] if p else math.nan for _, _, p in answers], dtype=torch.float32,
                                    device=device_of(images)) for part in PARTS}
        score = sum(self.weights[part] * parts[part] for part in PARTS)
        return score, parts

    def _request(self, jpeg: bytes, prompt: str):
        url_image = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url_image}},
                {"type": "text", "text": INSTRUCTION.format(prompt=prompt)},
            ]}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
        }).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"}

        def send(url: str) -> tuple[str, str, Mapping[str, float] | None]:
            reply = self.pool.post(url, body, headers)
            try:
                text = json.loads(reply)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                return url, reply.decode("utf-8", "replace"), None
            return url, text, parse_scores(text if isinstance(text, str) else "")

        return send
