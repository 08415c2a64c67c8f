"""GenEval (Ghosh et al. 2023) as a reward, scored by the GenEval reward server of Flow-GRPO and the Precise code
(``precise_sde/rewards/servers/geneval``): Mask2Former detections and CLIP colour checks against each prompt's
GenEval metadata (``tag``, ``include``, ``exclude``), served over HTTP.

Protocol (the published one): POST of ``pickle.dumps({"images": [JPEG bytes], "meta_datas": [dict],
"only_strict": bool})``; the reply is a pickled dict with per-image lists ``scores`` (partial credit in [0, 1],
the reward), ``rewards`` (GenEval's correctness, 0/1; all 0 when ``only_strict``), ``strict_rewards`` (exact
counts, 0/1) and, per GenEval tag, ``group_rewards`` / ``group_strict_rewards`` (-10 for images of other tags).

Unpickling a reply runs whatever code the server put in it: point ``urls`` only at servers you run.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from precise_lightning.rewards.jpeg import jpeg_bytes
from precise_lightning.rewards.remote import HttpPool, device_of, finite_or_nan, uint8_images
from precise_lightning.rewards.reward import Reward

log = logging.getLogger(__name__)

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
_NOT_THIS_TAG = -10.0  # the server's marker in the per-tag lists


class GenEvalReward(Reward):
    """``reward(images, prompts, metadata) -> ([B] scores, details)``; details: strict accuracy, accuracy and both
    per GenEval tag, each [B] with NaN where it does not apply (logged as ``train/reward_<name>/<detail>``).

    Args:
        urls: the server(s) (``http://host:18085``); several equivalent servers share the batches in turn.
        batch_size: images per request (the published client sends 64).
        only_strict: on rollouts the server skips GenEval's non-strict check (``accuracy`` is then not logged),
            as the published training calls do.
        eval_only_strict: the same on evaluation images; the published evaluation asks for both (false), so
            ``eval/reward_<name>/accuracy`` is GenEval's own score.
        timeout: seconds to wait for one reply (published: 120).
        retries: further attempts after a connection error, timeout, 429 or 5xx, waiting ``backoff * 2**k`` s
            (the published client retries 1000 times; a dead server should stop a run sooner).
        backoff: first wait between attempts, seconds.
        max_in_flight: requests at once (the published client sends one at a time).
        jpeg_quality: the published client's (PIL's default, 75).
    """

    wants_metadata = True
    required_metadata = ("tag", "include")
    wants_evaluating = True
    io_bound = True  # waits on a server: scored in the background while sampling goes on
    detail_names = ("strict_accuracy", "accuracy", *(f"{t}_strict_accuracy" for t in TAGS),
                    *(f"{t}_accuracy" for t in TAGS))
    may_abstain = True  # an unusable reply: no score for those images

    def __init__(self, urls: str | list[str] = "http://127.0.0.1:18085", batch_size: int = 64,
                 only_strict: bool = True, eval_only_strict: bool = False, timeout: float = 120.0, retries: int = 5,
                 backoff: float = 1.0, max_in_flight: int = 1, jpeg_quality: int = 75) -> None:
        super().__init__()
        if batch_size < 1 or not 1 <= jpeg_quality <= 95:
            raise ValueError(f"GenEvalReward: need batch_size >= 1 and jpeg_quality in [1, 95], got {batch_size}, "
                             f"{jpeg_quality}")
        self.pool = HttpPool(urls, timeout, retries, backoff, max_in_flight, "GenEvalReward")
        self.batch_size, self.only_strict, self.jpeg_quality = batch_size, only_strict, jpeg_quality
        self.eval_only_strict = eval_only_strict

    def forward(self, images: Tensor | np.ndarray, prompts: list[str], metadata: Sequence[dict[str, Any]],
                evaluating: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        missing = [p for p, m in zip(prompts, metadata) if any(k not in m for k in self.required_metadata)]
        if missing:
            raise ValueError(
                f"GenEvalReward needs GenEval metadata (tag, include, ...) for every prompt; {len(missing)} have "
                f"none, e.g. {missing[0]!r}: train on GenEval's .jsonl prompt files (see the README)"
            )
        only_strict = self.eval_only_strict if evaluating else self.only_strict
        pixels = uint8_images(images)
        starts = range(0, len(prompts), self.batch_size)
        requests = [self._request([jpeg_bytes(i, self.jpeg_quality) for i in pixels[s : s + self.batch_size]],
                                  [{**m, "prompt": p} for m, p in zip(metadata[s : s + self.batch_size],
                                                                      prompts[s : s + self.batch_size])],
                                  only_strict)
                    for s in starts]
        columns: dict[str, list[float]] = {name: [] for name in ("score", *self.detail_names)}
        for batch in self.pool.map(requests):
            for name, values in batch.items():
                columns[name] += values
        out = {name: torch.tensor(values, dtype=torch.float32, device=device_of(images))
               for name, values in columns.items()}
        return out.pop("score"), out

    def _request(self, jpegs: list[bytes], metadata: list[dict[str, Any]], only_strict: bool):
        body = pickle.dumps({"images": jpegs, "meta_datas": metadata, "only_strict": only_strict})

        def send(url: str) -> dict[str, list[float]]:
            reply = self.pool.post(url, body, {"Content-Type": "application/octet-stream"})
            return self._parse(url, reply, len(jpegs), only_strict)

        return send

    def _parse(self, url: str, reply: bytes, n: int, only_strict: bool) -> dict[str, list[float]]:
        """The reply's columns as floats; a reply without usable scores gives NaN everywhere, with a warning."""
        try:
            data = pickle.loads(reply)  # noqa: S301  (only from servers the user configured; see the module doc)
            scores = [finite_or_nan(v) for v in data["scores"]]
            strict = [finite_or_nan(v) for v in data["strict_rewards"]]
            correct = [math.nan if only_strict else finite_or_nan(v) for v in data["rewards"]]
            per_tag = {f"{t}_strict_accuracy": _tag_values(data["group_strict_rewards"], t, n) for t in TAGS}
            per_tag |= {f"{t}_accuracy": [math.nan] * n if only_strict else
                        _tag_values(data["group_rewards"], t, n) for t in TAGS}
            if not (len(scores) == len(strict) == len(correct) == n):
                raise ValueError(f"{len(scores)} scores for {n} images")
        except Exception as err:  # any malformed reply: no score for these images
            log.warning("GenEvalReward: unusable reply from %s (%s: %s) for %d images: their rewards are NaN: "
                        "they get advantage 0 and leave their groups' statistics", url, type(err).__name__, err, n)
            return {name: [math.nan] * n for name in ("score", *self.detail_names)}
        if any(math.isnan(s) for s in scores):
            log.warning("GenEvalReward: %s sent no score for %d of %d images: this iteration's update is skipped",
                        url, sum(math.isnan(s) for s in scores), n)
        return {"score": scores, "strict_accuracy": strict, "accuracy": correct, **per_tag}


def _tag_values(groups: dict[str, list], tag: str, n: int) -> list[float]:
    """One tag's per-image values, NaN for images of other tags (the server's -10) or a tag it did not send."""
    values = groups.get(tag)
    if values is None:
        return [math.nan] * n
    if len(values) != n:
        raise ValueError(f"{len(values)} {tag!r} values for {n} images")
    return [math.nan if v == _NOT_THIS_TAG else finite_or_nan(v) for v in values]
