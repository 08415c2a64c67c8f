"""Two CPU processes under DDP: the real multi-rank path (sharded groups, gathered rewards, accumulated syncs)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
import cli
out = {out!r}
run = cli.main([
    "--config", "configs/digits_precise.yaml", "--model.policy.init_args.hidden", "32",
    "--model.policy.init_args.pretrain_steps", "20", "--trainer.devices", "2", "--trainer.strategy", "ddp",
    "--trainer.max_steps", "4", "--trainer.val_check_interval", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.logger.init_args.save_dir", out, "--data.batch_size", "32", "--data.eval_batch_size", "16",
    "--data.eval_repeats", "2", "--model.micro_batch_size", "8", "--model.std_scope", "global",
], run=False)
run.trainer.fit(run.model, datamodule=run.datamodule)
params = {{n: p.detach() for n, p in run.model.policy.named_trainable_parameters()}}
torch.save({{"params": params, "metrics": {{k: float(v) for k, v in run.trainer.callback_metrics.items()}}}},
           f"{{out}}/rank{{run.trainer.global_rank}}.pt")
"""


def test_ddp_two_ranks_stay_in_sync(tmp_path):
    script = tmp_path / "fit_ddp.py"
    script.write_text(SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    env = {**os.environ, "PRECISE_LIGHTNING_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name, value in rank0["params"].items():  # gradients were all-reduced: replicas identical
        assert torch.equal(value, rank1["params"][name]), name
    assert rank0["metrics"]["train/ratio_drift_first"] == 0.0
    assert rank0["metrics"]["eval/reward"] == rank1["metrics"]["eval/reward"]  # synced metric
