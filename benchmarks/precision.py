"""Compute precision of the SD3.5 recipe: how far fp16 and bf16 autocast (16-mixed, bf16-mixed) move the velocity
and each trained step's log-prob from float32, on the tiny SD3.5 recipe (tiny random weights, the recipe's grid,
guidance and LoRA). One float32 rollout of 8 images; at every trained step the stored transition is re-scored with
the velocity computed under each autocast.

    python benchmarks/precision.py            # about 20 s on 2 CPU cores

Tiny random weights cannot show what real activations do in fp16 (overflow of large values); they do show the
rounding each format adds: fp16 keeps 11 significant bits, bf16 8.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
from precise_lightning.tiny import write_tiny  # noqa: E402

PROMPTS = ["a red cube on a wooden table", "a photo of a cat wearing a small hat"]
DTYPES = {"fp16 (16-mixed)": torch.float16, "bf16 (bf16-mixed)": torch.bfloat16}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = write_tiny(Path(tmp) / "tiny")
        run = cli.main(["--config", "configs/sd35_precise.yaml", "--config", "configs/tiny_cpu.yaml", "--model_root",
                        str(root), "--trainer.logger", "false"], run=False)
        module = run.model
        torch.manual_seed(0)
        with torch.no_grad():
            for p in module.policy.trainable_parameters():
                p.normal_(0, 0.02)  # LoRA B starts at 0: let the adapters act
            prompts = [p for p in PROMPTS for _ in range(4)]
            cond = module.policy.encode(prompts)
            noise = torch.randn(len(prompts), *module.policy.latent_shape)
            traj = module.sampler.sample(lambda x, t: module.policy.velocity(x, t, cond), noise,
                                         generator=torch.Generator().manual_seed(1))
            times = module.sampler.timesteps
            print("| step | t | " + " | ".join(f"{n}: rel. velocity error | {n}: max abs log-prob error"
                                                for n in DTYPES) + " |")
            print("|---|---|" + "---|---|" * len(DTYPES))
            worst = dict.fromkeys(DTYPES, 0.0)
            for k, i in enumerate(traj.sde_steps):
                x, t = traj.latents[i], torch.tensor(float(times[i]))
                v32 = module.policy.velocity(x, t, cond)
                cells = []
                for name, dtype in DTYPES.items():
                    with torch.autocast("cpu", dtype=dtype):
                        v = module.policy.velocity(x, t, cond).float()
                    rel = float((v - v32).norm() / v32.norm())
                    lp = module.sampler.score(i, x, v, traj.latents[i + 1]).log_prob
                    err = float((lp - traj.log_probs[:, k]).abs().max())
                    worst[name] = max(worst[name], rel)
                    cells += [f"{rel:.2e}", f"{err:.2e}"]
                print(f"| {i} | {float(times[i]):.3f} | " + " | ".join(cells) + " |")
            print("\nworst relative velocity error: " + ", ".join(f"{n} {w:.2e}" for n, w in worst.items()))


if __name__ == "__main__":
    main()
