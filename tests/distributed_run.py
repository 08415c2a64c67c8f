"""Run the shrunk demo through the CLI in this process (under DDP or FSDP2 Lightning launches the other ranks)
and save what the tests compare: ``python tests/distributed_run.py OUT_FILE CKPT_OR_- CLI_ARGS...``."""

import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
from precise_lightning.callbacks import EMA  # noqa: E402

out, ckpt, args = sys.argv[1], sys.argv[2], sys.argv[3:]
run = cli.main(args, run=False)
run.trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=None if ckpt == "-" else ckpt)
full = {n: p.full_tensor() if isinstance(p, DTensor) else p for n, p in run.model.policy.named_trainable_parameters()}
ema = next(cb for cb in run.trainer.callbacks if isinstance(cb, EMA)).state_dict()  # a collective under FSDP2
old = run.model.objective.state_dict()["old"] if run.model.objective is not None else {}  # so is this
if run.trainer.global_rank == 0:
    torch.save({"params": {n: p.detach().cpu() for n, p in full.items()}, "ema": ema,
                "old": {n: t.detach().cpu() for n, t in old.items()},
                "metrics": {k: float(v) for k, v in run.trainer.callback_metrics.items()},
                "rollouts": run.model.rollouts, "step": run.trainer.global_step}, out)
