"""RL speed per sampler on the digits demo, over seeds: held-out reward against rollouts and against training
seconds, the rollouts and seconds each sampler needs to reach a threshold (90% of the strongest rival's final
reward), as a ratio to that rival, and the area under the curve. Two rewards: the ODE evaluation of the EMA
weights (``eval/reward``) and the rewards of the run's own training samples (``train/reward``, the sampler's
noise included). Each run is ``cli.py fit`` on the demo config; runs go in parallel, one thread each.

    python benchmarks/rl_speed.py          # 4 samplers + precise at eta 1.0 / 2.0, with a sliding window, and
                                           # Precise-2M, x 5 seeds x 150 rollouts (about 13 min on 2 cores)
    python benchmarks/rl_speed.py --full   # the same runs to 300 rollouts
    python benchmarks/rl_speed.py --only precise flow_sde cps nft_ode nft_precise   # GRPO against DiffusionNFT

``nft_ode`` and ``nft_precise`` train with DiffusionNFT's objective (``model.objective``) on ODE and Precise rollouts;
the others with GRPO's PPO update on their samplers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
RIVALS = {"flow_sde": ["--model.sampler.init_args.rule", "flow_sde", "--model.sampler.init_args.eta", "0.7"],
          "cps": ["--model.sampler.init_args.rule", "cps", "--model.sampler.init_args.eta", "0.7"],
          "dance_sde": ["--model.sampler.init_args.rule", "dance_sde", "--model.sampler.init_args.eta", "0.3"]}
PRECISE = {"precise": ["--model.sampler.init_args.rule", "precise", "--model.sampler.init_args.eta", "1.5"]}
VARIANTS = {
    "precise_eta1.0": ["--model.sampler.init_args.rule", "precise", "--model.sampler.init_args.eta", "1.0"],
    "precise_eta2.0": ["--model.sampler.init_args.rule", "precise", "--model.sampler.init_args.eta", "2.0"],
    "precise_window": ["--model.sampler.init_args.rule", "precise", "--model.sampler.init_args.sde_window", "[0,4]",
                       "--model.sampler.init_args.window_shift_every", "25"],
    "precise_2m": ["--model.sampler.init_args.rule", "precise_2m", "--model.sampler.init_args.eta", "1.5"],
}
NFT = ["--model.objective", "precise_lightning.modules.nft.DiffusionNFT"]  # DiffusionNFT's update, not PPO's
OBJECTIVES = {"nft_ode": [*NFT, "--model.sampler.init_args.rule", "ode"],
              "nft_precise": [*NFT, "--model.sampler.init_args.rule", "precise", "--model.sampler.init_args.eta", "1.5"]}
CONFIGS = {**PRECISE, **RIVALS, **VARIANTS, **OBJECTIVES}


def run(name: str, seed: int, args: argparse.Namespace) -> Path:
    """One training run; returns its TensorBoard directory (reused if it already finished)."""
    save = args.out / "runs" / f"{name}_seed{seed}"
    done = save / "done"
    if not done.exists():
        cmd = [sys.executable, "cli.py", "fit", "--config", "configs/digits_precise.yaml", *CONFIGS[name],
               "--seed_everything", str(seed), "--data.seed", str(seed), "--trainer.max_steps", str(2 * args.rollouts),
               "--trainer.val_check_interval", str(args.eval_every), "--trainer.enable_progress_bar", "false",
               "--trainer.logger.init_args.save_dir", str(save), "--trainer.logger.init_args.version", "0"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if result.returncode:
            raise RuntimeError(f"{name} seed {seed} failed:\n{result.stderr[-3000:]}")
        done.touch()
    return save / "digits_precise" / "version_0"


def curves(log_dir: Path) -> dict[str, np.ndarray]:
    """eval/reward and train/reward per rollout, and cumulative training seconds (evaluation excluded)."""
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    train = np.array([e.value for e in acc.Scalars("train/reward")])
    seconds = np.concatenate([[0.0], np.cumsum([e.value for e in acc.Scalars("perf/s_per_rollout")])])
    evals = acc.Scalars("eval/reward")  # the first at rollout 0 (eval_at_start), then every eval_every rollouts
    eval_rollouts = np.array([0] + [e.step + 1 for e in evals[1:]])
    return {"eval": np.array([e.value for e in evals]), "eval_rollouts": eval_rollouts, "train": train,
            "seconds": seconds}


def first_reach(values: np.ndarray, at: np.ndarray, threshold: float) -> float:
    hit = np.nonzero(values >= threshold)[0]
    return float(at[hit[0]]) if len(hit) else float("nan")


def smooth(x: np.ndarray, k: int) -> np.ndarray:
    """Trailing mean over k rollouts: rollout rewards are noisy per batch."""
    return np.array([x[max(0, i - k + 1) : i + 1].mean() for i in range(len(x))])


def summarize(results: dict[str, list[dict]], kind: str, k: int) -> list[dict]:
    """Per config: final reward, AUC, rollouts and seconds to the threshold, ratios to the strongest rival."""
    def series(c: dict) -> tuple[np.ndarray, np.ndarray]:
        if kind == "eval":
            return c["eval"], c["eval_rollouts"]
        return smooth(c["train"], k), np.arange(1, len(c["train"]) + 1)

    finals = {n: np.mean([series(c)[0][-1] for c in runs]) for n, runs in results.items()}
    rival = max((n for n in results if n in RIVALS), key=finals.get)
    threshold = 0.9 * finals[rival]
    rows = {}
    for name, runs in results.items():
        reach, secs, auc, final = [], [], [], []
        for c in runs:
            values, at = series(c)
            reach.append(first_reach(values, at, threshold))
            secs.append(float(np.interp(reach[-1], np.arange(len(c["seconds"])), c["seconds"]))
                        if np.isfinite(reach[-1]) else float("nan"))
            auc.append(float(np.trapezoid(values, at) / (at[-1] - at[0])))
            final.append(float(values[-1]))
        rows[name] = {"final": final, "auc": auc, "rollouts": reach, "seconds": secs}

    def stats(v: np.ndarray) -> tuple[float, float, int]:
        ok = np.asarray(v, dtype=float)[np.isfinite(v)]
        return (float(ok.mean()), float(ok.std()), len(ok)) if len(ok) else (float("nan"), float("nan"), 0)

    out = []
    for name, row in rows.items():
        ratio_r = np.array(row["rollouts"]) / stats(rows[rival]["rollouts"])[0]
        ratio_s = np.array(row["seconds"]) / stats(rows[rival]["seconds"])[0]
        out.append({"config": name, "rival": rival, "threshold": threshold, **{
            key: stats(v) for key, v in [("final", row["final"]), ("auc", row["auc"]), ("rollouts", row["rollouts"]),
                           ("seconds", row["seconds"]), ("ratio_rollouts", ratio_r), ("ratio_seconds", ratio_s)]}})
    return out


def print_table(rows: list[dict], title: str, seeds: int) -> None:
    rival, threshold = rows[0]["rival"], rows[0]["threshold"]
    print(f"\n{title}: threshold = 0.9 x final of the strongest rival ({rival}) = {threshold:.3f};"
          f" mean ± std over {seeds} seeds; 'reached' counts the seeds that got there")
    print(f"| {'config':<15} | final | AUC | rollouts to threshold | seconds to threshold | ratio (rollouts) "
          "| ratio (seconds) | reached |")
    print("|---|---|---|---|---|---|---|---|")
    def f(r: dict, key: str, p: int = 3) -> str:
        return f"{r[key][0]:.{p}f} ± {r[key][1]:.{p}f}"

    for r in rows:
        print(f"| {r['config']:<15} | {f(r, 'final')} | {f(r, 'auc')} | {f(r, 'rollouts', 0)} | {f(r, 'seconds', 1)} | "
              f"{f(r, 'ratio_rollouts', 2)} | {f(r, 'ratio_seconds', 2)} | {r['rollouts'][2]}/{seeds} |")


def plot(results: dict[str, list[dict]], k: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for name, runs in results.items():
        for row, kind in enumerate(("eval", "train")):
            if kind == "eval":
                ys, xs = np.stack([c["eval"] for c in runs]), runs[0]["eval_rollouts"]
            else:
                ys, xs = np.stack([smooth(c["train"], k) for c in runs]), np.arange(1, len(runs[0]["train"]) + 1)
            secs = np.mean([np.interp(xs, np.arange(len(c["seconds"])), c["seconds"]) for c in runs], axis=0)
            for col, x in enumerate((xs, secs)):
                ax = axes[row, col]
                ax.plot(x, ys.mean(0), label=name)
                ax.fill_between(x, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.2)
                ax.set_xlabel("rollouts" if col == 0 else "training seconds (2 parallel runs on 2 cores)")
                ax.set_ylabel("held-out reward (ODE, EMA)" if kind == "eval" else f"rollout reward (own sampler, "
                                                                                  f"mean of {k})")
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rollouts", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--smooth", type=int, default=10, help="rollouts averaged for the rollout-reward curve")
    parser.add_argument("--full", action="store_true", help="300 rollouts per run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "rl_speed")
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="these configs (at least one GRPO rival)")
    args = parser.parse_args()
    names = args.only or list(CONFIGS)
    if not any(n in RIVALS for n in names):
        parser.error(f"--only needs one of the rivals {list(RIVALS)}: the threshold is 90% of the strongest's")
    if args.full:
        args.rollouts = max(args.rollouts, 300)
        args.out = args.out.with_name(args.out.name + "_full")
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, seed) for seed in range(args.seeds) for name in names]
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = list(pool.map(lambda job: run(*job, args), jobs))
    results: dict[str, list[dict]] = {name: [] for name in names}
    for (name, _), log_dir in zip(jobs, dirs):
        results[name].append(curves(log_dir))
    tables = {kind: summarize(results, kind, args.smooth) for kind in ("eval", "train")}
    print_table(tables["eval"], "Held-out reward, ODE sampler, EMA weights", args.seeds)
    print_table(tables["train"], f"Rollout reward, each run's own training sampler (mean of {args.smooth})",
                args.seeds)
    (args.out / "summary.json").write_text(json.dumps(tables, indent=1))
    plot(results, args.smooth, args.out / "rl_speed.png")
    print(f"\nplot: {args.out / 'rl_speed.png'}")


if __name__ == "__main__":
    main()
