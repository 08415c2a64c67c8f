"""One live fit per run directory: a second one is refused before it writes anything there, a killed run leaves no
stale lock, and validating beside a run keeps the run's own config.yaml."""

import os
import signal
import subprocess
import sys

import pytest

import cli
from conftest import ROOT, demo_args
from precise_lightning.run_dirs import RunDirectoryInUse, lock_run_directory


def test_a_second_live_fit_in_a_run_directory_is_refused_before_it_writes(tmp_path):
    version = tmp_path / "digits_precise" / "version_0"
    version.mkdir(parents=True)
    (version / "config.yaml").write_text("the first run's config\n")
    held = lock_run_directory(version)  # the first run, still live
    run = cli.main(demo_args(tmp_path, "--trainer.logger.init_args.version", "0"), run=False)
    holder = rf"run directory {version} is in use by a live run \(pid {os.getpid()} "
    with pytest.raises(RunDirectoryInUse, match=holder):
        run.trainer.fit(run.model, datamodule=run.datamodule)
    assert (version / "config.yaml").read_text() == "the first run's config\n"
    assert not (version / "checkpoints").exists()
    held.close()  # the first run ends: the directory is free again (its resume logs there)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step == 8 and (version / "checkpoints" / "last.ckpt").is_file()
    fit_config = (version / "config.yaml").read_text()
    cli.main(["validate", *demo_args(tmp_path), "--ckpt_path", str(version / "checkpoints" / "last.ckpt")])
    assert (version / "config.yaml").read_text() == fit_config  # the fit's, not replaced by the validation's
    assert "ckpt_path: " in (version / "config_validate.yaml").read_text()


@pytest.mark.slow  # a subprocess fit, killed
def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
            "from precise_lightning.run_dirs import lock_run_directory; "
            f"h = lock_run_directory(Path({str(tmp_path)!r})); print('locked', flush=True); "
            "import time; time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirectoryInUse, match=f"pid {proc.pid} on "):
        lock_run_directory(tmp_path)
    proc.send_signal(signal.SIGKILL)  # no clean-up runs
    proc.wait()
    lock_run_directory(tmp_path).close()
