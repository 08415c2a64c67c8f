"""Trainer overhead: the wall time of one GRPO iteration divided by the time of the model work it cannot avoid,
in one process, on the digits demo and on the tiny SD3.5 recipe (random weights of the published classes).

The iteration is measured inside ``Trainer.fit`` with the config's own callbacks and logger (evaluation off), from
one ``on_train_batch_start`` to the next: Lightning's loop, data, callbacks and logging included. The model work
is the same module's networks run bare on the same batch right after each iteration (in pairs, because this
machine's speed drifts by tens of percent over minutes), with no sampler, loss or logging around them: prompt
encoding, the rollout's forwards (every step, every micro-batch), VAE decoding, the reward forwards, the trained
forwards with their backwards (and the reference forwards when the KL is on), and the optimizer steps. Everything else
(step-rule math, log-probs, noise, losses, gradient clipping, diagnostics, the Lightning loop) is overhead, broken
down by where it happens. The ratio is the median over pairs; the parts are means, so that they add up; the
first two iterations (warm-up) and the last (it ends with the export) are left out. Prints two tables and saves a
stacked bar chart.

    python benchmarks/overhead.py                     # demo and tiny SD3.5, CPU (about 1.5 min on 2 cores)
    python benchmarks/overhead.py --settings demo --iterations 20
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from itertools import pairwise
from multiprocessing import get_context
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from precise_lightning import cli
from precise_lightning.modules.checks import micro_slices, update_groups
from precise_lightning.policies.base import slice_cond

SETTINGS = {
    "demo": ["--config", "configs/digits_precise.yaml"],
    "sd35_tiny": ["--config", "configs/sd35_precise.yaml", "--config", "configs/tiny_cpu.yaml"],
}
PHASES = ["encode", "rollout", "reward", "update"]
WORK = ["encode", "rollout forwards", "decode", "reward forwards", "trained forwards + backwards",
        "reference forwards", "optimizer steps"]
# Which model work each logged phase contains; the rest of the phase is its overhead.
PHASE_WORK = {"encode": ["encode"], "rollout": ["rollout forwards", "decode"], "reward": ["reward forwards"],
              "update": ["trained forwards + backwards", "reference forwards", "optimizer steps"]}


class PairedClock(Callback):
    """Times each loop iteration and, right after it, the bare model work of the same batch (the two in pairs, so
    that this machine's speed drifting over minutes cancels); the bare run's own time is left out of the loop's."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.bare_seconds: list[float] = []
        self.works: list[dict[str, float]] = []
        self.images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.marks.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images = len(batch["prompts"])
        start = time.perf_counter()
        self.works.append(model_work(pl_module, batch["prompts"]))
        self.bare_seconds.append(time.perf_counter() - start)

    def on_train_end(self, trainer, pl_module) -> None:
        self.marks.append(time.perf_counter())

    def iterations(self) -> list[float]:
        return [b - a - bare for a, b, bare in zip(self.marks[:-1], self.marks[1:], self.bare_seconds)]


class Stopwatch:
    """Accumulated seconds per named piece of work (synchronising CUDA around each)."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.seconds[name] += time.perf_counter() - start


def model_work(module: LightningModule, prompts: list[str]) -> dict[str, float]:
    """Seconds of the networks' own work for one iteration on ``prompts``, run bare (see the module docstring)."""
    trainer = module.trainer
    hp, policy, sampler = module.hparams, module.policy, module.sampler
    scorer, optimizer = module.scorer, trainer.optimizers[0]
    slices = micro_slices(len(prompts), hp.micro_batch_size, hp.updates_per_rollout)
    times = sampler.timesteps.tolist()
    steps = module.trained_steps(sampler.sde_steps_at(module.rollouts))
    groups = update_groups(len(slices), hp.updates_per_rollout)
    clock = Stopwatch(module.device)
    with trainer.precision_plugin.train_step_context():
        with clock("encode"), torch.no_grad():
            cond = policy.encode(prompts)
        noise = torch.randn(len(prompts), *policy.latent_shape, device=module.device)
        states = []  # per micro-batch, the latent before each step
        with clock("rollout forwards"), torch.no_grad():
            for s in slices:
                x, cond_s, xs = noise[s], slice_cond(cond, s), []
                for t, t_next in pairwise(times):
                    xs.append(x)
                    x = x + (t_next - t) * policy.velocity(x, torch.tensor(t, device=x.device), cond_s)
                states.append(xs + [x])
        with clock("decode"), torch.no_grad():
            images = policy.decode(torch.cat([xs[-1] for xs in states]))
        with clock("reward forwards"), torch.no_grad():
            for reward in scorer.rewards.values():
                reward(images, prompts)
        for _ in range(hp.inner_epochs):
            for group in groups:
                for m in group:
                    cond_m = slice_cond(cond, slices[m])
                    t = {i: torch.tensor(times[i], device=module.device) for i in steps}
                    if hp.beta > 0:
                        with clock("reference forwards"), torch.no_grad(), policy.reference():
                            for i in steps:
                                policy.velocity(states[m][i], t[i], cond_m)
                    for i in steps:
                        with clock("trained forwards + backwards"):
                            policy.velocity(states[m][i], t[i], cond_m).float().square().mean().backward()
                with clock("optimizer steps"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
    return dict(clock.seconds)


def measure(setting: str, model_root: str, iterations: int, logs: str) -> dict:
    """One setting in its own process (so its peak memory is its own): fit, timing each iteration and its bare
    model work in pairs."""
    overrides = [*SETTINGS[setting], "--model_root", model_root, "--trainer.limit_val_batches", "0",
                 "--model.eval_at_start", "false", "--trainer.enable_progress_bar", "false",
                 "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", logs,
                 "--trainer.logger.init_args.name", setting]
    run = cli.main(overrides, run=False)
    hp = run.model.hparams
    run.trainer.fit_loop.epoch_loop.max_steps = iterations * hp.updates_per_rollout * hp.inner_epochs
    clock = PairedClock()
    run.trainer.callbacks.append(clock)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    # Iterations after two of warm-up (allocator, lazy initialisation, optimizer state) and before the last (which
    # ends with on_train_end's export). Parts are means, so that they add up; the ratio is the median of the pairs'.
    kept = slice(2, iterations - 1)
    acc = EventAccumulator(run.trainer.logger.log_dir)
    acc.Reload()
    walls, works = clock.iterations()[kept], clock.works[kept]
    ratios = sorted(w / sum(work.values()) for w, work in zip(walls, works))
    row = {"setting": setting, "iteration": statistics.mean(walls), "ratio": statistics.median(ratios),
           "ratio_range": (ratios[0], ratios[-1]), "pairs": len(ratios),
           "step": statistics.mean(e.value for e in acc.Scalars("perf/s_per_rollout")[kept])}
    for phase in PHASES:
        row[phase] = statistics.mean(e.value for e in acc.Scalars(f"time/{phase}_s")[kept])
    for name in WORK:
        row[name] = statistics.mean(work.get(name, 0.0) for work in works)
    row["work"] = sum(row[name] for name in WORK)
    row["images"] = clock.images
    row["peak_gib"] = (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [(name, lambda r, n=name: r[n]) for name in WORK]
    parts += [(f"{phase} overhead", lambda r, p=phase: overhead(r, p)) for phase in PHASES]
    parts += [("between phases", lambda r: r["step"] - sum(r[p] for p in PHASES)),
              ("after the step's timer", lambda r: r["iteration"] - r["step"])]
    fig, ax = plt.subplots(figsize=(9, 1.2 * len(rows) + 2.5))
    left = [0.0] * len(rows)
    colors = plt.get_cmap("tab20").colors
    for k, (name, value) in enumerate(parts):
        shares = [max(value(r), 0.0) / r["work"] for r in rows]
        ax.barh([r["setting"] for r in rows], shares, left=left, label=name, color=colors[k % len(colors)],
                hatch="" if k < len(WORK) else "//")
        left = [a + b for a, b in zip(left, shares)]
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("time of one iteration / time of its model work (solid: model work, hatched: overhead)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def overhead(row: dict, phase: str) -> float:
    return row[phase] - sum(row[name] for name in PHASE_WORK[phase])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; {args.iterations} iterations per setting, means over {args.iterations - 3} of them")
    rows = []
    with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as logs:
        if "sd35_tiny" in args.settings:
            from precise_lightning.tiny import write_tiny

            write_tiny(root)
        for setting in args.settings:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                rows.append(pool.submit(measure, setting, root, args.iterations, logs).result())
            print(f"  {setting}: iteration {rows[-1]['iteration']:.3f} s, model work {rows[-1]['work']:.3f} s",
                  flush=True)
    print("\n| setting | images | iteration s | model work s | ratio, median (range) over pairs | peak memory GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["ratio_range"]
        print(f"| {r['setting']} | {r['images']} | {r['iteration']:.3f} | {r['work']:.3f} | "
              f"{r['ratio']:.2f} ({low:.2f}–{high:.2f}, {r['pairs']} pairs) | {r['peak_gib']:.2f} |")
    print("\nWhere an iteration's time goes (seconds; model work, then overhead by where it happens):\n")
    names = [r["setting"] for r in rows]
    print("| part | " + " | ".join(names) + " |")
    print("|---" * (len(rows) + 1) + "|")
    lines = [(name, [r[name] for r in rows]) for name in WORK]
    lines += [(f"{phase} phase minus its model work", [overhead(r, phase) for r in rows]) for phase in PHASES]
    lines += [("between phases (finite checks, phase-time logs)", [r["step"] - sum(r[p] for p in PHASES) for r in rows]),
              ("after the step's timer (log_iteration's self.log calls, Lightning's loop, callbacks, TensorBoard, data)",
               [r["iteration"] - r["step"] for r in rows])]
    for name, values in lines:
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    print("(peak memory: GPU allocator on CUDA, the process's peak RSS on CPU)")
    plot(rows, args.out / "overhead.png")


if __name__ == "__main__":
    main()
