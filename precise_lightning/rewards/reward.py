"""The type of every reward model: what the trainer calls, and the class attributes that say how to call it."""

from __future__ import annotations

from torch import nn


class Reward(nn.Module):
    """``forward(images [B, C, H, W] in [0, 1], prompts) -> [B]`` (or ``([B], {detail: [B]})`` with
    ``detail_names``), with no grad. ``reward.rewards`` and ``reward.metrics`` take subclasses of this class.

    Class attributes: ``wants_metadata`` (the prompt file's other fields reach ``forward`` as ``metadata``, one
    dict per image) and ``required_metadata`` (fields every prompt must have: checked in the prompt files when the
    config is parsed); ``wants_evaluating`` (``forward`` is told whether images are evaluation images);
    ``io_bound`` (waits on a server: scored in a background thread); ``detail_names`` (the parts it also returns);
    ``may_abstain`` (a NaN score means it gave none for that image, e.g. a judge's answer without scores: the
    image gets advantage 0 and leaves its group's statistics, as the Precise code treats its -10 sentinel,
    ``stat_tracking.py:17-49``; a NaN from any other reward is a fault, and the iteration's update is skipped).
    A reward that cannot score some prompts (the OCR reward: one without quoted text) says why in
    :meth:`prompt_problem`, checked on the prompt files when the config is parsed.
    """

    wants_metadata: bool = False
    required_metadata: tuple[str, ...] = ()
    wants_evaluating: bool = False
    io_bound: bool = False
    detail_names: tuple[str, ...] = ()
    may_abstain: bool = False

    @classmethod
    def prompt_problem(cls, prompt: str) -> str | None:
        """Why this reward cannot score ``prompt`` (None: it can)."""
        return None
