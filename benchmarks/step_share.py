"""Which trained step drives the update? Each step's share of the gradient norm on the tiny SD3.5 recipe (the
recipe's 10-step shift-3 grid, guidance, LoRA and KL, with tiny random weights), with and without GRPO-Guard
ratio normalisation (and for CPS with its code's undivided log-prob, ``log_prob_form: cps``), for Precise, CPS
and Flow-GRPO's SDE, beside the closed-form ``|d mean / d v| / std`` of each
step, which sets how strongly a mean-reduced log-prob reacts to the velocity there.

    python benchmarks/step_share.py            # about 1 min on 2 CPU cores

One rollout of 8 images (2 prompts x 4), one fixed set of advantages drawn N(0, 1); for each trained step the
loss of that step alone (all micro-batches) is back-propagated and the LoRA gradient's norm taken. Shares are
each step's norm over the sum of norms.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
from precise_lightning.sampling import velocity_gain  # noqa: E402
from precise_lightning.tiny import write_tiny  # noqa: E402

SAMPLERS = {"precise": 1.5, "cps": 0.7, "flow_sde": 0.7}
PROMPTS = ["a red cube on a wooden table", "a photo of a cat wearing a small hat"]


# The PPO ratio each column takes: plain Gaussian, GRPO-Guard's, and (CPS only) the CPS code's undivided log-prob.
VARIANTS = {
    "plain": ["--model.ratio_norm", "false"],
    "ratio-normalised": ["--model.ratio_norm", "true"],
    "CPS code's log-prob": ["--model.ratio_norm", "false", "--model.log_prob_form", "cps"],
}


def step_norms(root: Path, rule: str, eta: float, variant: list[str], seed: int) -> dict[int, float]:
    """Gradient norm of the LoRA weights from each trained step's loss alone, at the first update of a rollout."""
    run = cli.main(["--config", "configs/sd35_precise.yaml", "--config", "configs/tiny_cpu.yaml", "--model_root",
                    str(root), "--model.sampler.init_args.rule", rule, "--model.sampler.init_args.eta", str(eta),
                    *variant, "--trainer.logger", "false"], run=False)
    module = run.model
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.policy.trainable_parameters():
            p.normal_(0, 0.02)  # LoRA B starts at 0: give every adapter a gradient path
    prompts = [p for p in PROMPTS for _ in range(4)]
    cond = module.policy.encode(prompts)
    slices = module._micro_slices(len(prompts))
    noise = torch.randn(len(prompts), *module.policy.latent_shape)
    trajectories, _ = module.rollout(cond, noise, slices, torch.Generator().manual_seed(seed))
    advantages = torch.randn(len(prompts), generator=torch.Generator().manual_seed(seed + 1))
    times, params = module.sampler.timesteps, module.policy.trainable_parameters()
    norms = {}
    for i in trajectories[0].sde_steps:
        for m, s in enumerate(slices):
            cond_m = {k: v[s] for k, v in cond.items()}
            ref = module._reference_means(trajectories[m], cond_m, [i])[i]
            out = module._step_loss(trajectories[m], cond_m, advantages[s], i, float(times[i]), float(times[i + 1]), ref)
            out["loss"].backward()
        norms[i] = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in params if p.grad is not None)))
        for p in params:
            p.grad = None
    return norms, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_tiny(Path(tmp) / "tiny")
        for rule, eta in SAMPLERS.items():
            shares = {}
            for name, variant in VARIANTS.items():
                if "log_prob_form" in " ".join(variant) and rule != "cps":
                    continue
                norms, times = step_norms(root, rule, eta, variant, args.seed)
                total = sum(norms.values())
                shares[name] = {i: n / total for i, n in norms.items()}
            print(f"\n{rule} (eta {eta}), tiny SD3.5 recipe, 10 steps, shift 3")
            print("| step | t -> t' | \\|d mean / d v\\| / std | " + " | ".join(f"share, {n}" for n in shares) + " |")
            print("|---|---|---|" + "---|" * len(shares))
            for i in shares["plain"]:
                t, t_next = float(times[i]), float(times[i + 1])
                std = float(torch.as_tensor(_std(rule, t, t_next, eta)))
                gain = abs(velocity_gain(rule, t, t_next, eta))
                print(f"| {i} | {t:.3f} -> {t_next:.4f} | {gain / std:.2f} | "
                      + " | ".join(f"{share[i]:.3f}" for share in shares.values()) + " |")


def _std(rule: str, t: float, t_next: float, eta: float) -> torch.Tensor:
    from precise_lightning.sampling import transition

    zero = torch.zeros(1, dtype=torch.float64)
    return transition(rule, zero, zero, t, t_next, eta)[1]


if __name__ == "__main__":
    main()
