"""Does every distributed run exit cleanly? Runs the shrunk demo under 2-process DDP and 2-process FSDP2 (gloo, CPU)
``--runs`` times each through ``python cli.py fit`` (what a user's ``torchrun ... cli.py fit`` runs) and prints a
table of exit codes, with the last lines of any failing run, and the torch version.

    python benchmarks/distributed_exit.py --runs 20          # about 12 min on 2 CPU cores

A run passes when it exits 0 and leaves its ``last.ckpt`` and its TensorBoard events behind.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = {
    "ddp": ["--trainer.strategy", "ddp"],
    "fsdp2": ["--trainer.strategy", "precise_lightning.sharding.ShardedStrategy",
              "--trainer.strategy.init_args.data_parallel_size", "2",
              "--trainer.strategy.init_args.tensor_parallel_size", "1", "--model.shard_param_dtype", "float32"],
}

# LoRA on a frozen (sharded) base with a KL reference and GRPO-Guard: the setting whose FSDP2 run aborted at exit.
SETTING = ["--model.policy.init_args.lora_rank", "4", "--model.policy.init_args.lora_targets", "[inp, mid1, mid2, out]",
           "--model.beta", "0.05", "--model.ratio_norm", "true"]


def fit(strategy: str, out: Path, cache: Path) -> tuple[int, str, bool]:
    """(exit code, last output lines, whether the checkpoint and the event file exist) of one 2-process fit."""
    args = [sys.executable, "cli.py", "fit", "--config", "configs/digits_precise.yaml",
            "--model.policy.init_args.hidden", "32", "--model.policy.init_args.pretrain_steps", "20",
            "--trainer.devices", "2", "--trainer.max_steps", "4", "--trainer.val_check_interval", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(out),
            "--data.batch_size", "16", "--data.eval_batch_size", "16", "--data.eval_repeats", "2",
            "--model.micro_batch_size", "8", *SETTING, *STRATEGIES[strategy]]
    env = {**os.environ, "PRECISE_LIGHTNING_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    intact = any(out.glob("*/version_*/checkpoints/last.ckpt*")) and any(out.glob("*/version_*/events.out.*"))
    return result.returncode, (result.stdout + result.stderr)[-1500:], intact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.runs} runs per strategy, 2 processes each (gloo)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for strategy in args.strategies:
            codes: collections.Counter[int] = collections.Counter()
            broken, start = 0, time.perf_counter()
            for i in range(args.runs):
                code, tail, intact = fit(strategy, tmp / f"{strategy}_{i}", tmp / "cache")
                codes[code] += 1
                broken += not intact
                if code != 0 or not intact:
                    print(f"--- {strategy} run {i}: exit {code}, outputs intact: {intact}\n{tail}\n---")
            print(f"| {strategy} | runs {args.runs} | exit codes {dict(codes)} | missing outputs {broken} | "
                  f"{time.perf_counter() - start:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
