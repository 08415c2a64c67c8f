"""The sampler a config chooses: a step rule, its noise level, a time grid and an optional SDE window."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from precise_lightning.sampling.grids import LinearGrid, TimeGrid
from precise_lightning.sampling.rollout import Generators, StepOutput, Trajectory, Velocity, rollout, sde_step
from precise_lightning.sampling.rules import check_rule, previous_step, transition, velocity_gain


class Sampler:
    """Stochastic (or ODE) sampler over ``num_steps`` steps of ``grid``.

    Args:
        rule: step rule, one of ``ode``, ``flow_sde``, ``dance_sde``, ``cps``, ``precise``, ``precise_2m``,
            ``dance_precise``.
        eta: noise level; None takes the rule's default (precise 1.5, flow_sde / cps 0.7, dance 0.3).
        num_steps: number of steps N (network evaluations), at least 2.
        grid: time grid family; None takes the policy's own (SD3: the scheduler's shifted grid; FLUX.2 Klein: its
            pipeline's grid at the policy's resolution; others, and a sampler used without a policy: uniform in t).
        sde_window: ``[start, stop)`` step indices that are stochastic (MixGRPO / Flow-GRPO "fast"); the others
            are Euler steps. None makes every step but the last stochastic.
        log_prob_reduce: ``mean`` (reference implementations, clip ranges calibrated to it) or ``sum`` over elements.
        window_shift_every: MixGRPO's sliding window: every this many rollouts the ``sde_window`` moves
            ``window_stride`` steps towards t = 0, keeping its size, and starts over from its first position once
            it would pass the last stochastic step (MixGRPO's FLUX recipe: window 4, every 25, stride 1). None
            keeps the window fixed.
        window_stride: steps the window moves per shift.
        lower_order_final: multistep rules (``precise_2m``) take a first-order step into the last nonzero time,
            as DPM-Solver++ does on short grids.
        stochastic_last_step: the last step (into t = 0), never trained, is the rule's transition with its noise
            instead of x0_hat. The Precise code samples its comparisons' ``flow_grpo`` and ``dance_grpo`` so
            (``sde_with_logprob.py:59-67``: std about 0.21 / 0.15 from t 0.263 on the Klein grid), as Flow-GRPO's own
            code does; Precise and CPS add no noise there either way.
    """

    def __init__(
        self,
        rule: str = "precise",
        eta: float | None = None,
        num_steps: int = 10,
        grid: TimeGrid | None = None,
        sde_window: tuple[int, int] | None = None,
        log_prob_reduce: str = "mean",
        window_shift_every: int | None = None,
        window_stride: int = 1,
        lower_order_final: bool = True,
        stochastic_last_step: bool = False,
    ) -> None:
        self.eta = check_rule(rule, eta)
        self.rule = rule
        if int(num_steps) != num_steps or num_steps < 2:
            raise ValueError(f"num_steps must be an integer >= 2, got {num_steps}")
        self.num_steps = int(num_steps)
        if log_prob_reduce not in ("mean", "sum"):
            raise ValueError(f"log_prob_reduce must be 'mean' or 'sum', got {log_prob_reduce!r}")
        self.log_prob_reduce = log_prob_reduce
        self.grid = grid
        if sde_window is not None:
            start, stop = sde_window
            if rule == "ode":
                raise ValueError("rule 'ode' has no stochastic steps: drop sde_window or choose a stochastic rule")
            if not 0 <= start < stop <= self.num_steps - 1:
                raise ValueError(
                    f"sde_window {list(sde_window)} must satisfy 0 <= start < stop <= {self.num_steps - 1} "
                    f"(steps are 0..{self.num_steps - 1} and the last one is deterministic)"
                )
        self.sde_window = sde_window
        if window_shift_every is not None:
            if sde_window is None:
                raise ValueError("window_shift_every slides the sde_window: give an initial sde_window [start, stop)")
            if window_shift_every < 1 or window_stride < 1:
                raise ValueError(f"window_shift_every ({window_shift_every}) and window_stride ({window_stride}) "
                                 "must be >= 1")
        self.window_shift_every, self.window_stride = window_shift_every, window_stride
        self.lower_order_final = lower_order_final
        if stochastic_last_step and rule == "ode":
            raise ValueError("rule 'ode' has no noise to add on the last step: drop stochastic_last_step")
        self.stochastic_last_step = stochastic_last_step
        self._timesteps: Tensor | None = None
        if grid is not None:
            self.timesteps  # noqa: B018 - validates the grid now, at config parse

    def check_trainable(self) -> None:
        """Raise if a step that may be trained adds no noise: its log-prob is degenerate and nothing trains there."""
        start = self.sde_window[0] if self.sde_window else 0
        steps = range(start, self.num_steps - 1) if self.window_shift_every else self.sde_steps
        times, zero = self.timesteps, torch.zeros(1, dtype=torch.float64)
        silent = [i for i in steps if float(transition(self.rule, zero, zero, times[i], times[i + 1], self.eta)[1]) == 0]
        if silent:
            raise ValueError(
                f"the training sampler (rule {self.rule!r}, eta {self.eta}) adds no noise on trained steps {silent}: "
                "their log-probs are degenerate and nothing trains; give an eta that adds noise (the rule's default: "
                "model.sampler.init_args.eta null)"
            )

    def swamped_steps(self) -> tuple[list[int], list[int]]:
        """Stochastic steps whose noise swamps the transition (std above the next noise level t_next: more noise
        than the whole marginal at t_next holds; equal is a full renoise, as Precise's first step and CPS at eta 1
        do by design) and those whose mean overshoots the data (on x_t = t eps with the exact velocity eps, the
        mean's share of eps is below 0, i.e. past x0)."""
        times = self.timesteps
        swamped, overshoot = [], []
        for i in self.sde_steps:
            t, t_next = times[i : i + 1], times[i + 1 : i + 2]
            eps = torch.ones(1, dtype=torch.float64)
            j = previous_step(self.rule, i, times, self.lower_order_final)
            context = {"d_prev": torch.zeros_like(eps), "t_prev": times[j]} if j is not None else {}
            mean, std = transition(self.rule, t * eps, eps, t, t_next, self.eta, **context)
            if float(std) > float(t_next) * (1 + 1e-6):
                swamped.append(i)
            if float(mean) < 0:
                overshoot.append(i)
        return swamped, overshoot

    def warn_if_swamped(self) -> None:
        """Warn (once: where the module is built) when :meth:`swamped_steps` are more than half the stochastic
        steps: rollouts are then mostly noise and rewards stay at chance (a few such steps are Euler-Maruyama's
        known excess noise at coarse steps at the published settings, e.g. flow_sde at eta 0.7)."""
        swamped, overshoot = self.swamped_steps()
        parts = [f"its noise exceeds the next noise level on steps {swamped}" if swamped else "",
                 f"its mean overshoots the data on steps {overshoot}" if overshoot else ""]
        if 2 * len(set(swamped) | set(overshoot)) > len(self.sde_steps):
            warnings.warn(f"the training sampler (rule {self.rule!r}, eta {self.eta}): "
                          f"{' and '.join(p for p in parts if p)}: rollouts there are noise, and rewards are likely "
                          "to stay at chance. Lower model.sampler.init_args.eta (null: the rule's default)",
                          UserWarning, stacklevel=2)

    def for_policy(self, policy: Any) -> Sampler:
        """Without a grid of its own, take the policy's (``policy.default_grid()``); returns self."""
        if self.grid is None:
            self.grid = policy.default_grid()
            self._timesteps = None
            self.timesteps  # noqa: B018
        return self

    @property
    def timesteps(self) -> Tensor:
        """[N + 1] float64, from 1 to 0."""
        if self._timesteps is None:
            grid = self.grid if self.grid is not None else LinearGrid()
            times = grid(self.num_steps)
            if not (times[0] == 1 and times[-1] == 0 and (times.diff() < 0).all()):
                raise ValueError(f"{type(grid).__name__} must give times decreasing from 1 to 0")
            self._timesteps = times
        return self._timesteps

    @property
    def sde_steps(self) -> list[int]:
        """Indices of the stochastic steps, the only ones with a log-prob (and so the only trainable ones)."""
        return self.sde_steps_at(0)

    def sde_steps_at(self, rollout: int) -> list[int]:
        """The stochastic steps of the ``rollout``-th rollout (they differ from :attr:`sde_steps` only when the
        window slides)."""
        if self.rule == "ode":
            return []
        start, stop = self.sde_window if self.sde_window is not None else (0, self.num_steps - 1)
        if self.window_shift_every is not None:
            positions = (self.num_steps - 1 - stop) // self.window_stride + 1  # window starts that fit
            shift = (rollout // self.window_shift_every) % positions * self.window_stride
            start, stop = start + shift, stop + shift
        return list(range(start, stop))

    def sample(
        self, velocity: Velocity, noise: Tensor, generator: Generators = None, keep_means: bool = False,
        rollout_index: int = 0,
    ) -> Trajectory:
        """Roll out from ``noise`` [B, ...] (no grad), the ``rollout_index``-th rollout of a run (it places a sliding
        window); see :func:`precise_lightning.sampling.rollout`."""
        return rollout(
            velocity,
            noise,
            self.timesteps,
            self.rule,
            self.eta,
            sde_steps=self.sde_steps_at(rollout_index),
            generator=generator,
            keep_means=keep_means,
            reduce=self.log_prob_reduce,
            lower_order_final=self.lower_order_final,
            stochastic_last_step=self.stochastic_last_step,
        )

    def step_times(self, step: int) -> tuple[float, float]:
        """``(t, t')`` of step ``step``: the times it moves between."""
        return float(self.timesteps[step]), float(self.timesteps[step + 1])

    def gain(self, step: int) -> float:
        """``d mean / d v`` of step ``step``'s transition (:func:`velocity_gain`): how far a velocity change moves
        the mean, what GRPO-Guard divides the loss by and the KL forms read."""
        t, t_next = self.step_times(step)
        return velocity_gain(self.rule, t, t_next, self.eta, self.previous_time(step))

    def previous_time(self, step: int) -> float | None:
        """The time of the previous step whose x0_hat step ``step`` reads (multistep rules), else None."""
        j = previous_step(self.rule, step, self.timesteps, self.lower_order_final)
        return None if j is None else float(self.timesteps[j])

    def score(self, step: int, x: Tensor, v: Tensor, x_next: Tensor, d_prev: Tensor | None = None) -> StepOutput:
        """Log-prob (with grad through ``v``) of a stored transition ``x -> x_next`` of step ``step``; a multistep
        rule also needs the x0_hat its rollout read there (``Trajectory.d_prev[k]``, held fixed)."""
        times = self.timesteps.to(device=x.device, dtype=x.dtype)
        t_prev = self.previous_time(step)
        context = {}
        if t_prev is not None:
            if d_prev is None:
                raise ValueError(f"rule {self.rule!r} step {step} reads the previous step's x0_hat: pass the "
                                 "trajectory's d_prev")
            context = {"d_prev": d_prev, "t_prev": times.new_tensor(t_prev)}
        return sde_step(self.rule, x, v, times[step], times[step + 1], self.eta, x_next, reduce=self.log_prob_reduce,
                        **context)

    def __repr__(self) -> str:
        window = f", sde_window={list(self.sde_window)}" if self.sde_window else ""
        if self.window_shift_every:
            window += f" sliding by {self.window_stride} every {self.window_shift_every} rollouts"
        if self.stochastic_last_step:
            window += ", stochastic_last_step=True"
        return f"Sampler(rule={self.rule!r}, eta={self.eta}, num_steps={self.num_steps}{window})"


def seeded_generators(seed: int, num_steps: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per step, seeded ``seed * 1_000 + step``, so each step's noise is reproducible on its own."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000 + i) for i in range(num_steps)]
