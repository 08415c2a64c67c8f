"""Rewards scored by a server the user runs: GenEval's object detector (mmdet 2.x on torch 2.1) and VLM judges behind
vLLM or sglang cannot share the trainer's environment. One HTTP client serves both: URLs taken in turn, a timeout,
retries with exponential backoff on connection errors, timeouts, 429 and 5xx, a bounded number of requests in
flight, and an error naming the URL and what failed once the retries are spent.

A reply that arrives but holds no usable score gives NaN for the images it covers (with a warning naming the URL):
the iteration's rewards are then not finite and the update is skipped through the module's fault path
(``max_bad_iterations`` in a row stop the run). Nothing made up is trained on.
"""

from __future__ import annotations

import http.client
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from precise_lightning.rewards.preprocess import to_uint8

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class RemoteRewardError(RuntimeError):
    """A reward server could not be reached or refused the request, retries spent."""


def _excerpt(body: bytes | str, limit: int = 200) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    lines = [line for line in text.strip().splitlines() if line.strip()]
    text = lines[-1] if lines else "(empty)"  # a server traceback's last line says what went wrong
    return text if len(text) <= limit else text[:limit] + "..."


class HttpPool:
    """POSTs to one or more equivalent servers with retries and at most ``max_in_flight`` requests at once (over
    every call, from any thread: several micro-batches may be in flight together).

    Proxies from the environment are not used (reward servers sit on the cluster's own network), as in the
    published GenEval client.
    """

    def __init__(self, urls: str | Sequence[str], timeout: float, retries: int, backoff: float, max_in_flight: int,
                 owner: str) -> None:
        urls = [urls] if isinstance(urls, str) else list(urls)
        bad = [u for u in urls if not isinstance(u, str) or not u.startswith(("http://", "https://"))]
        if not urls or bad:
            raise ValueError(f"{owner}.urls must be one or more http:// or https:// URLs of running servers, got "
                             f"{bad or urls!r}")
        if timeout <= 0 or retries < 0 or backoff < 0 or max_in_flight < 1:
            raise ValueError(f"{owner}: need timeout > 0, retries >= 0, backoff >= 0 and max_in_flight >= 1, got "
                             f"{timeout}, {retries}, {backoff}, {max_in_flight}")
        self.urls, self.timeout, self.retries, self.backoff = urls, timeout, retries, backoff
        self.max_in_flight, self.owner = max_in_flight, owner
        self._slots = threading.BoundedSemaphore(max_in_flight)  # over all calls at once, whatever their thread
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> bytes:
        """The reply's body; retried on connection errors, timeouts and ``RETRIED_STATUS``; any other HTTP error,
        or the last failure once retries are spent, raises :class:`RemoteRewardError`."""
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with self._slots, self._opener.open(request, timeout=self.timeout) as reply:
                    return reply.read()
            except urllib.error.HTTPError as err:
                failure = f"HTTP {err.code}: {_excerpt(err.read())}"
                if err.code not in RETRIED_STATUS:
                    raise RemoteRewardError(f"{self.owner}: {url} refused the request ({failure})") from err
            except TimeoutError:
                failure = f"no reply within timeout={self.timeout} s"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, reset, cut short
                reason = getattr(err, "reason", err)
                failure = f"no reply within timeout={self.timeout} s" if isinstance(reason, TimeoutError) else \
                    f"connection failed ({reason})"
        raise RemoteRewardError(
            f"{self.owner}: {url} failed {self.retries + 1} times, last: {failure}. Is the server running and "
            f"reachable from this machine? (config keys: urls, timeout, retries)"
        )

    def map(self, requests: Sequence[Callable[[str], T]]) -> list[T]:
        """``request(url)`` for each, URLs taken in turn, at most ``max_in_flight`` at once; results in order."""
        if len(requests) == 1:
            return [requests[0](self.urls[0])]
        with ThreadPoolExecutor(min(self.max_in_flight, len(requests))) as pool:
            futures = [pool.submit(r, self.urls[i % len(self.urls)]) for i, r in enumerate(requests)]
            return [future.result() for future in futures]


def uint8_images(images: Tensor | np.ndarray) -> np.ndarray:
    """images [B, C, H, W] in [0, 1] -> [B, H, W, 3] uint8 (as the published clients round them); a uint8 array
    [B, H, W, 3] passes as it is (what :class:`~precise_lightning.callbacks.rewards.ScoringRound` hands an
    ``io_bound`` reward in its background thread: torch ops there would slow the training thread, see there)."""
    if isinstance(images, np.ndarray):
        return images
    return to_uint8(images).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu().numpy()


def device_of(images: Tensor | np.ndarray) -> torch.device:
    return images.device if isinstance(images, Tensor) else torch.device("cpu")


def finite_or_nan(value: object) -> float:
    """A reply's number as float; anything else (None, text, a sentinel the server sent) as NaN."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan
