"""Seconds per training phase (encode, rollout, reward, update) and peak memory of the SD3.5 Medium and FLUX.2 Klein
recipes, on random weights of the published architectures (no download), through the real configs and trainer.

The pipelines (and the recipes' reward models) are written with random weights in the published formats to a
temporary model root and loaded by the product's own code; each recipe then runs a few iterations on one device
with its own sampler, guidance, LoRA and reward, evaluation off. ``--depth N`` caps every layer stack of the
base model (transformer blocks, text-encoder layers; Klein's Qwen3 keeps the 28 layers the pipeline reads) for
machines where the full depth does not fit: the widths, resolution and step counts stay the published ones.
Phase times are medians over the iterations after the first (warm-up). Prints a table and saves a bar chart.

    python benchmarks/models.py                                        # GPU: full size, bf16
    python benchmarks/models.py --depth 2 --resolution 256 --batch 4   # what fits a 2-core, 24 GB CPU machine
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from precise_lightning import cli
from precise_lightning.architectures.rewards import write_clip_rewards, write_hpsv2
from precise_lightning.policies.flux2 import Flux2KleinPolicy
from precise_lightning.policies.sd3 import SD3Policy

RECIPES = {  # name: (config, policy)
    "sd35": ("configs/sd35_precise.yaml", SD3Policy),
    "flux2_klein": ("configs/flux2_klein_precise.yaml", Flux2KleinPolicy),
}
PHASES = ["encode", "rollout", "reward", "update"]


def run_recipe(name: str, root: Path, args: argparse.Namespace, logs: Path) -> dict:
    config, policy = RECIPES[name]
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        policy.build(args.size, args.depth).save_pretrained(root / policy.hub_id)
    write_s = time.perf_counter() - start
    gpu = torch.cuda.is_available()
    overrides = [
        "--config", config, "--model_root", str(root),
        "--trainer.accelerator", "gpu" if gpu else "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.precision", "bf16-mixed" if gpu else "32-true",
        "--trainer.max_steps", str(2 * args.iterations), "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(logs), "--trainer.callbacks", "[]",
        "--model.policy.init_args.resolution", str(args.resolution),
        "--model.micro_batch_size", str(args.batch // 2),
        "--data.train_file", "configs/prompts/smoke_train.txt", "--data.eval_file", "configs/prompts/smoke_eval.txt",
        "--data.group_size", str(args.batch // 2), "--data.batch_size", str(args.batch),
    ]
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    run = cli.main(overrides, run=False)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    (version,) = sorted((logs / run.trainer.logger.name).glob("version_*"))[-1:]
    acc = EventAccumulator(str(version))
    acc.Reload()
    row = {"recipe": name, "write_s": write_s, "params_b": sum(p.numel() for p in run.model.policy.parameters()) / 1e9}
    for phase in PHASES:
        values = [e.value for e in acc.Scalars(f"time/{phase}_s")]
        row[phase] = statistics.median(values[1:] or values)
    row["peak_gib"] = (torch.cuda.max_memory_allocated() if gpu else
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    print(f"  {name}: " + ", ".join(f"{p} {row[p]:.2f} s" for p in PHASES), flush=True)
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 1.2 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for phase in PHASES:
        values = [r[phase] for r in rows]
        ax.barh([r["recipe"] for r in rows], values, left=left, label=phase)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("seconds per iteration")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--depth", type=int, default=None, help="cap on every layer stack of the base model")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="images per iteration (2 prompts x batch/2)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; {args.size} architectures, depth {args.depth or 'full'}, {args.resolution} px, "
          f"{args.batch} images per iteration, {args.iterations} iterations")
    rows = []
    with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as logs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            write_clip_rewards(Path(root), args.size)
            write_hpsv2(Path(root), args.size)
        for name in args.recipes:
            rows.append(run_recipe(name, Path(root), args, Path(logs)))
    print("\n| recipe | policy params (B) | encode s | rollout s | reward s | update s | peak memory GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['params_b']:.2f} | {r['encode']:.2f} | {r['rollout']:.2f} | {r['reward']:.2f} | "
              f"{r['update']:.2f} | {r['peak_gib']:.1f} |")
    print("(seconds per iteration; peak memory: GPU allocator on CUDA, process peak RSS on CPU, cumulative over rows)")
    plot(rows, args.out / "models.png")


if __name__ == "__main__":
    main()
