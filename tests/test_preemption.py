"""Preemption as a cluster does it: SIGTERM to a running ``cli.py fit`` saves a resumable checkpoint at the end of
the current iteration, the process exits non-zero, and the resumed run ends exactly where an uninterrupted one does;
Ctrl-C does the same with exit status 130, and a second Ctrl-C stops at once."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli
from conftest import ROOT, demo_args, run_dir, scalars
from precise_lightning.callbacks import Preemption


STEPS = ["--trainer.max_steps", "16", "--trainer.val_check_interval", "4", "--data.batch_size", "16",
         "--model.micro_batch_size", "8"]  # 8 rollouts, evaluations (and last.ckpt) after rollouts 4 and 8


def _fit(log_dir, signal_after: int, signum: int = signal.SIGTERM):
    """``python cli.py fit`` in a subprocess, sent ``signum`` once it has done ``signal_after`` rollouts."""
    progress = log_dir.parent / f"{log_dir.name}.progress"
    args = demo_args(log_dir, *STEPS, "--trainer.callbacks+=pacing.Pacing", f"--trainer.callbacks.path={progress}")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.Popen([sys.executable, "cli.py", "fit", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (progress.exists() and progress.read_text() and int(progress.read_text()) >= signal_after):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signum)
    output = proc.communicate(timeout=300)[0]
    return proc.returncode, output


@pytest.mark.slow  # three fits, one of them a subprocess
def test_sigterm_saves_at_the_iteration_end_exits_non_zero_and_resumes_exactly(tmp_path):
    cli.main(["fit", *demo_args(tmp_path / "full", *STEPS)])  # uninterrupted, in this process
    code, output = _fit(tmp_path / "stopped", signal_after=5)  # after the evaluation at rollout 4
    assert code == 143, output[-3000:]
    assert "SIGTERM received: saved a resumable checkpoint after rollout" in output
    checkpoint = run_dir(tmp_path / "stopped") / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    stopped_at = state["grpo"]["rollouts"]
    assert 5 <= stopped_at < 8 and state["global_step"] == 2 * stopped_at  # newer than the last evaluation (4)
    cli.main(["fit", *demo_args(tmp_path / "resumed", *STEPS), "--ckpt_path", str(checkpoint)])
    full, resumed = (torch.load(run_dir(tmp_path / d) / "checkpoints" / "last.ckpt", map_location="cpu",
                                weights_only=False) for d in ("full", "resumed"))
    assert full["global_step"] == resumed["global_step"] == 16
    for key, value in full["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    rewards = scalars(run_dir(tmp_path / "full"))["train/reward"]
    assert scalars(run_dir(tmp_path / "resumed"))["train/reward"] == rewards[stopped_at:]


@pytest.mark.slow  # a subprocess fit
def test_ctrl_c_saves_at_the_iteration_end_and_exits_130(tmp_path):
    code, output = _fit(tmp_path / "stopped", signal_after=5, signum=signal.SIGINT)
    assert code == 130, output[-3000:]
    assert "Ctrl-C again stops at once" in output and "SIGINT received: saved a resumable checkpoint" in output
    checkpoint = run_dir(tmp_path / "stopped") / "checkpoints" / "last.ckpt"
    assert f"Resume with --ckpt_path {checkpoint}" in output
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert 5 <= state["grpo"]["rollouts"] < 8  # the iteration it was in, newer than the evaluation at 4


def test_a_second_ctrl_c_stops_at_once():
    callback = Preemption()
    callback.on_train_start(None, None)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: noted, the run goes on to the iteration's end
        assert callback._signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes of this thread
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        callback.on_train_end(None, None)
