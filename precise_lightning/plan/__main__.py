"""``python -m precise_lightning.plan --config RECIPE.yaml [--config OVERLAY.yaml] [--devices 8] [--gpu-memory-gb 80]
[--json] [dotted overrides as in cli.py]``: see :mod:`precise_lightning.plan`."""

from __future__ import annotations

import argparse
import json
import sys

from precise_lightning.cli import user_errors
from precise_lightning.plan import plan

parser = argparse.ArgumentParser(prog="python -m precise_lightning.plan", description=__doc__)
parser.add_argument("--config", action="append", required=True, help="a recipe config; repeat to stack overlays")
parser.add_argument("--devices", type=int, default=8, help="GPUs per node (with trainer.num_nodes nodes)")
parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU, in GB (1e9 bytes)")
parser.add_argument("--tflops", type=float, default=400.0,
                    help="sustained bf16 TFLOP/s of one GPU that the rough time assumes (about 40%% of an H100's peak)")
parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
args, overrides = parser.parse_known_args()
sys.argv = sys.argv[:1]  # the overrides reach the trainer's parser as its args, not again through argv
if args.devices < 1 or args.gpu_memory_gb <= 0 or args.tflops <= 0:
    parser.error("--devices, --gpu-memory-gb and --tflops must be positive")
config_args = [a for path in args.config for a in ("--config", path)] + overrides
config_args += ["--trainer.devices", str(args.devices)]
result = user_errors(plan, config_args, args.devices, args.gpu_memory_gb, args.tflops)
if args.json:
    print(json.dumps(result, indent=2))
    sys.exit(0)
print(f"{result['recipe']}: {result['devices']} GPU(s) x {result['gpu_memory_gb']:g} GB "
      f"({'FSDP2, sharded' if result['sharded'] else 'DDP, replicated'}), batch {result['batch_size']} per GPU in "
      f"micro-batches of {result['micro_batch_size']}")
print(f"\n{'per GPU':<62} {'GB':>8}")
for name, gb in result["components"].items():
    print(f"  {name:<60} {gb:>8.2f}")
for name, gb in result["phases_gb"].items():
    print(f"  + {name[:58]:<58} {gb:>8.2f}")
print(f"  {'peak (resident + the largest phase)':<60} {result['peak_gb']:>8.2f}")
verdict = "fits" if result["fits"] else "does NOT fit"
print(f"\n{verdict} in {result['usable_gb']:g} GB usable ({result['gpu_memory_gb']:g} GB less 10% for the CUDA "
      f"context and fragmentation)")
for line in result["advice"]:
    print(f"  - {line}")
print("\nparameters: " + ", ".join(f"{k} {v / 1e6:,.1f}M" for k, v in result["parameters"].items())
      + f"; trainable {result['trainable_parameters'] / 1e6:,.2f}M")
s = result["seconds_per_iteration"]
print(f"rough time per iteration at {s['at_tflops']:g} TFLOP/s: encode {s['encode']:.1f} s, rollout "
      f"{s['rollout']:.1f} s, update {s['update']:.1f} s, total {s['total']:.1f} s (rewards not counted)")
