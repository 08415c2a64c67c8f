"""GPU acceptance run, no download: each recipe at its published size with random weights (the policy's
``random_weights``; reward models written at real size to a temporary model root), a few iterations at the
recipe's per-GPU batch on one GPU, then the recipe's FSDP2 fit over every local GPU. Prints seconds per iteration
split into encode / rollout / reward / update, the peak memory next to the plan's prediction
(``python -m precise_lightning.plan``), the largest |ratio - 1| before the first update (must be exactly 0) and
whether the sharded fit finished; writes the figures as JSON.

    python benchmarks/gpu_check.py                         # GPU: both recipes, fits in 8 minutes on one 140 GB GPU
    python benchmarks/gpu_check.py --batch 48 --iterations 2    # shorter
    python benchmarks/gpu_check.py --tiny                  # CPU, tiny models, under a minute (CI keeps it alive)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from precise_lightning import cli
from precise_lightning.tiny import write_tiny
from precise_lightning.architectures.rewards import write_clip_rewards, write_hpsv2, write_imagereward

RECIPES = {"sd35": "configs/sd35_precise.yaml", "flux2_klein": "configs/flux2_klein_precise.yaml"}
PHASES = ["encode", "rollout", "reward", "update"]


def recipe_args(config: str, root: Path, logs: Path, args: argparse.Namespace) -> list[str]:
    """The recipe as written, on one device, with its per-GPU batch (or ``--batch``), evaluation and callbacks off."""
    extra = ["--config", "configs/tiny_cpu.yaml"] if args.tiny else [
        "--trainer.devices", "1", "--trainer.strategy", "auto", "--model.policy.init_args.random_weights", "true"]
    batch = ["--data.batch_size", str(args.batch)] if args.batch else []
    return ["--config", config, *extra, "--model_root", str(root), *batch,
            "--trainer.max_steps", str(2 * args.iterations), "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(logs), "--trainer.callbacks", "[]",
            "--data.train_file", "configs/prompts/smoke_train.txt",
            "--data.eval_file", "configs/prompts/smoke_eval.txt"]


def start_plan(name: str, root: Path, logs: Path, args: argparse.Namespace) -> subprocess.Popen:
    """The plan of the same run, computed on the CPU in its own process while the GPU trains (minutes at real size)."""
    command = [sys.executable, "-m", "precise_lightning.plan", "--json", "--devices", "1",
               "--gpu-memory-gb", str(args.gpu_memory_gb), *recipe_args(RECIPES[name], root, logs, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_recipe(name: str, root: Path, logs: Path, args: argparse.Namespace) -> dict:
    overrides = recipe_args(RECIPES[name], root, logs, args)
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    run = cli.main(["fit", *overrides])
    version = sorted((logs / run.trainer.logger.name).glob("version_*"))[-1]
    acc = EventAccumulator(str(version))
    acc.Reload()
    row = {"recipe": name, "batch": run.datamodule.hparams.batch_size,
           "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if gpu else None,
           "ratio_drift_first": max(e.value for e in acc.Scalars("train/ratio_drift_first"))}
    for phase in PHASES:
        values = [e.value for e in acc.Scalars(f"time/{phase}_s")]
        row[f"{phase}_s"] = statistics.median(values[1:] or values)
    print(f"  {name}: " + ", ".join(f"{p} {row[f'{p}_s']:.2f} s" for p in PHASES) + f"; peak {row['peak_gb']} GB; "
          f"ratio drift before the first update {row['ratio_drift_first']}",
          flush=True)
    return row


def sharded_fit(name: str, root: Path, logs: Path, args: argparse.Namespace) -> dict:
    """The recipe under FSDP2 over every local GPU, in its own process (Lightning launches one per GPU)."""
    gpus = torch.cuda.device_count()
    if gpus < 1:
        return {"recipe": name, "sharded_fit": "skipped: no GPU"}
    overrides = recipe_args(RECIPES[name], root, logs / "fsdp", args)
    overrides += ["--config", "configs/fsdp.yaml", "--trainer.precision", "bf16-mixed", "--trainer.devices", str(gpus),
                  "--trainer.strategy.init_args.data_parallel_size", str(gpus)]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "cli.py", "fit", *overrides], capture_output=True, text=True)
    return {"recipe": name, "gpus": gpus, "sharded_fit_exit": done.returncode,
            "sharded_fit_s": round(time.perf_counter() - start, 1), "sharded_fit_tail": done.stderr[-1500:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks the script itself)")
    parser.add_argument("--batch", type=int, default=None, help="images per GPU (default: the recipe's)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--gpu-memory-gb", type=float, default=140.0)
    parser.add_argument("--no-sharded", action="store_true", help="skip the FSDP2 fits")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/gpu_check.json"))
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device} x {max(torch.cuda.device_count(), 1)}; {'tiny' if args.tiny else 'published'} sizes")
    results = {"device": device, "date": time.strftime("%Y-%m-%d"), "recipes": [], "sharded": []}
    with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as logs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if args.tiny:
                write_tiny(root)
            else:  # reward models at real size; the base models are built in place (random_weights)
                write_clip_rewards(Path(root), "real")
                write_hpsv2(Path(root), "real")
                write_imagereward(Path(root), "real")
        plans = {name: start_plan(name, Path(root), Path(logs), args) for name in args.recipes}
        for name in args.recipes:
            results["recipes"].append(run_recipe(name, Path(root), Path(logs), args))
        for row in results["recipes"]:
            out, err = plans[row["recipe"]].communicate()
            row["plan_peak_gb"] = json.loads(out)["peak_gb"] if out.strip() else f"plan failed: {err[-500:]}"
            print(f"  {row['recipe']}: measured peak {row['peak_gb']} GB, plan {row['plan_peak_gb']} GB", flush=True)
        if not args.no_sharded and not args.tiny:
            for name in args.recipes:
                results["sharded"].append(sharded_fit(name, Path(root), Path(logs), args))
                print(f"  {name} FSDP2 fit: exit {results['sharded'][-1].get('sharded_fit_exit')}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
