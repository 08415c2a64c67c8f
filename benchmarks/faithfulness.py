"""Faithfulness toy (Precise paper): sample an equal-mass double ring with every step rule at N = 10..160 steps.

The data is a Gaussian mixture, so x0_hat = E[x0 | x_t] and the velocity are exact; any error left is the sampler's.
Prints, on a uniform grid and on the SD3 shift-3 grid, the outer-ring mass (target 0.5), the ring width (mean
distance to the nearest ring; excess noise widens it) and the sliced Wasserstein-1 distance to exact samples,
and saves a plot. Then the per-step excess noise in closed form: for point-mass data (x0 = 0, so x_t ~ N(0, t^2)
and the exact velocity is x / t), the std of x_{t'} after one step of each rule, divided by the exact t'; 1 is
faithful, above 1 is the noise Euler-Maruyama inflates. Reported as the worst and the mean ratio over a grid's
steps (the last step, to t' = 0, excluded).

    python benchmarks/faithfulness.py [--samples 10000] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from precise_lightning.sampling import DEFAULT_ETA, LinearGrid, Sampler, SD3Grid, TimeGrid, transition

RADII = (1.0, 2.0)
POINTS_PER_RING = 12
COMPONENT_STD = 0.08
# (label, rule, eta, lower_order_final): each rule at its default eta, Precise-2M also at eta = sqrt(2) (diffusers'
# SDE-DPM-Solver++(2M)) and without its first-order step into the last nonzero time.
VARIANTS = [(rule, rule, DEFAULT_ETA[rule], True) for rule in
            ["ode", "flow_sde", "dance_sde", "cps", "precise", "dance_precise", "precise_2m"]]
VARIANTS += [("precise_2m eta=sqrt2", "precise_2m", math.sqrt(2), True),
             ("precise_2m, all 2nd order", "precise_2m", DEFAULT_ETA["precise_2m"], False)]
STEPS = [10, 20, 40, 80, 160]


def ring_means() -> torch.Tensor:
    """[2 * P, 2] component means: P points evenly on each ring (equal mass per ring)."""
    angle = torch.arange(POINTS_PER_RING, dtype=torch.float64) * 2 * math.pi / POINTS_PER_RING
    circle = torch.stack([angle.cos(), angle.sin()], dim=1)
    return torch.cat([r * circle for r in RADII])


def exact_samples(n: int, generator: torch.Generator) -> torch.Tensor:
    means = ring_means()
    k = torch.randint(len(means), (n,), generator=generator)
    return means[k] + COMPONENT_STD * torch.randn(n, 2, generator=generator, dtype=torch.float64)


def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = (x - E[x0 | x_t]) / t for the mixture, with x_t | k ~ N((1-t) mu_k, ((1-t)^2 s^2 + t^2) I)."""
    means, s2 = ring_means().to(x), COMPONENT_STD**2
    var_t = (1 - t) ** 2 * s2 + t**2
    diff = x[:, None, :] - (1 - t) * means[None]  # [n, K, 2]
    weights = torch.softmax(-(diff**2).sum(-1) / (2 * var_t), dim=1)  # equal priors cancel
    x0_given_k = means[None] + (1 - t) * s2 / var_t * diff
    x0_hat = (weights[..., None] * x0_given_k).sum(1)
    return (x - x0_hat) / t


def outer_mass(x: torch.Tensor) -> float:
    return (x.norm(dim=1) > sum(RADII) / 2).double().mean().item()


def ring_width(x: torch.Tensor) -> float:
    radius = x.norm(dim=1, keepdim=True)
    return (radius - torch.tensor(RADII, dtype=x.dtype)).abs().min(dim=1).values.mean().item()


def sliced_w1(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 between equal-size samples: mean over random directions of sorted-projection gaps."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(projections, generator=g, dtype=torch.float64) * math.pi
    dirs = torch.stack([angle.cos(), angle.sin()])  # [2, L]
    pa, pb = (a @ dirs).sort(0).values, (b @ dirs).sort(0).values
    return (pa - pb).abs().mean().item()


METRICS = [("outer-ring mass", outer_mass), ("ring width", ring_width)]
GRIDS: dict[str, TimeGrid] = {"uniform": LinearGrid(), "sd3-shift3": SD3Grid(3.0)}


def evaluate(grid: TimeGrid, noise: torch.Tensor, reference: torch.Tensor) -> dict[str, dict[int, list[float]]]:
    """{rule: {N: [outer mass, ring width, sliced W1]}} and the N = 10 samples for the plot."""
    table, finals = {}, {}
    for label, rule, eta, lower_order_final in VARIANTS:
        table[label] = {}
        for n in STEPS:
            sampler = Sampler(rule, eta, num_steps=n, grid=grid, lower_order_final=lower_order_final)
            x = sampler.sample(exact_velocity, noise, generator=torch.Generator().manual_seed(n)).latents[-1]
            table[label][n] = [fn(x) for _, fn in METRICS] + [sliced_w1(x, reference)]
            if n == STEPS[0]:
                finals[label] = x
    return table, finals


def step_std_ratios(rule: str, eta: float, times: torch.Tensor) -> torch.Tensor:
    """[N - 1] std of x_{t'} / t' after one step from the exact marginal N(0, t^2) of point-mass data x0 = 0.

    Every rule's mean is affine in x when v = x / t, so the marginal std is sqrt((a t)^2 + std^2), a = d mean / dx.
    (Precise-2M's extra term vanishes here: x0_hat is 0 at every step, so its row is Precise's.)
    """
    ratios = []
    for t, t_next in zip(times[:-2].tolist(), times[1:-1].tolist()):
        x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
        mean, std = transition(rule, x, x / t, t, t_next, eta)
        slope = (mean[1] - mean[0]).item()
        ratios.append(math.sqrt((slope * t) ** 2 + float(std.max()) ** 2) / t_next)
    return torch.tensor(ratios)


def excess_noise_table() -> None:
    for name, grid in GRIDS.items():
        print(f"[{name} grid] one-step marginal std / exact t' for point-mass data (1 = faithful): worst / mean "
              "over steps\n| rule | eta | " + " | ".join(f"N={n}" for n in STEPS) + " |")
        print("|---|---|" + "---|" * len(STEPS))
        for label, rule, eta, lower_order_final in VARIANTS:
            if not lower_order_final:  # one step's spread: the same as with it
                continue
            cells = []
            for n in STEPS:
                r = step_std_ratios(rule, eta, Sampler(rule, num_steps=n, grid=grid).timesteps)
                cells.append(f"{r.max():.3f} / {r.mean():.3f}")
            print(f"| {label} | {eta:.3g} | " + " | ".join(cells) + " |")
        print()


def print_table(title: str, table: dict, col: int) -> None:
    print(f"{title}\n| rule | eta | " + " | ".join(f"N={n}" for n in STEPS) + " |")
    print("|---|---|" + "---|" * len(STEPS))
    for label, _, eta, _ in VARIANTS:
        print(f"| {label} | {eta:.3g} | " + " | ".join(f"{table[label][n][col]:.3f}" for n in STEPS) + " |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    reference = exact_samples(args.samples, g)
    floor = sliced_w1(reference, exact_samples(args.samples, g))
    noise = torch.randn(args.samples, 2, generator=g, dtype=torch.float64)
    start = time.perf_counter()
    print(f"double ring, {args.samples} samples, exact velocity, eta = each rule's default unless shown")
    print(f"exact samples: outer mass {outer_mass(reference):.3f}, ring width {ring_width(reference):.3f}, "
          f"sliced W1 between two exact sets (noise floor) {floor:.3f}\n")
    results = {}
    for name, grid in GRIDS.items():
        results[name], finals = evaluate(grid, noise, reference)
        for col, title in enumerate([m for m, _ in METRICS] + ["sliced W1 to exact samples"]):
            print_table(f"[{name} grid] {title}", results[name], col)
        if name == "sd3-shift3":
            plot(results, finals, reference, args.out)
    excess_noise_table()
    print(f"total time: {time.perf_counter() - start:.1f} s")


def plot(results: dict, finals: dict, reference: torch.Tensor, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 6, figsize=(24, 8))
    for ax, (name, x) in zip(axes.flat, [("exact", reference)] + list(finals.items())[:8]):
        ax.scatter(x[:4000, 0], x[:4000, 1], s=1, alpha=0.4)
        ax.set_title(name if name == "exact" else f"{name}, N={STEPS[0]}, sd3 grid")
        ax.set(aspect="equal", xlim=(-3, 3), ylim=(-3, 3))
    panels = [(g, col, m) for g in results for col, (m, _) in enumerate(METRICS)][:3]
    for ax, (grid, col, metric) in zip(axes.flat[9:], panels):
        for label, *_ in VARIANTS:
            ax.plot(STEPS, [results[grid][label][n][col] for n in STEPS], marker="o", label=label)
        ax.axhline({0: outer_mass, 1: ring_width}[col](reference), color="k", ls="--", lw=1)
        ax.set(xscale="log", xlabel="steps N", ylabel=metric, title=f"{metric}, {grid} grid")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "faithfulness.png", dpi=90)
    print(f"plot: {out / 'faithfulness.png'}")


if __name__ == "__main__":
    main()
