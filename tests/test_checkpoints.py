"""Checkpoint files are never half-written and never silently wrong: a save that fails midway leaves the previous
file whole and stops the run at once; a changed byte in a tensor is caught on load, naming the newest intact
checkpoint; a directory that cannot be written stops the run at its first save."""

import pytest
import torch

import cli
from conftest import demo_args, run_dir
from precise_lightning.checkpoint_io import CheckpointError, VerifiedCheckpointIO


def _fit(log_dir, *extra, ckpt=None):
    run = cli.main(demo_args(log_dir, "--trainer.max_steps", "4", "--trainer.val_check_interval", "1", *extra),
                   run=False)
    run.trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=ckpt)
    return run


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint_and_stops_the_run(tmp_path, monkeypatch):
    run = _fit(tmp_path)
    last = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    before = last.read_bytes()

    def killed_midway(obj, f):  # the first bytes reach the disk, then the write dies
        f.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("precise_lightning.checkpoint_io.torch.save", killed_midway)
    with pytest.raises(CheckpointError, match=r"could not write the checkpoint .*last.ckpt: \[Errno 28\].*"
                                              "the previous one is intact"):
        run.trainer.save_checkpoint(last)  # overwriting the run's last.ckpt
    assert last.read_bytes() == before and not list(last.parent.glob(".*.tmp"))  # whole, and no leftovers
    with pytest.raises(CheckpointError, match=r"\[Errno 28\] No space left on device. The run stops"):
        _fit(tmp_path / "resumed", "--trainer.max_steps", "8", ckpt=str(last))  # at its first save, not later
    monkeypatch.undo()
    assert VerifiedCheckpointIO().load_checkpoint(last)["global_step"] == 4


def test_a_changed_byte_is_caught_on_load_and_the_newest_intact_checkpoint_named(tmp_path):
    run = _fit(tmp_path)
    checkpoints = run_dir(tmp_path) / "checkpoints"
    run.trainer.save_checkpoint(checkpoints / "earlier.ckpt")
    last = checkpoints / "last.ckpt"
    data = bytearray(last.read_bytes())
    weight = next(iter(torch.load(last, weights_only=False)["state_dict"].values()))
    at = data.find(weight.reshape(-1)[:4].numpy().tobytes())  # inside a tensor: torch's zip reader does not notice
    assert at > 0
    data[at : at + 8] = bytes(8)
    last.write_bytes(bytes(data))
    assert not torch.equal(next(iter(torch.load(last, weights_only=False)["state_dict"].values())), weight)
    with pytest.raises(CheckpointError, match=f"checkpoint {last} does not match the checksum.*"
                                              f"newest intact checkpoint beside it is {checkpoints / 'earlier.ckpt'}"):
        _fit(tmp_path / "resumed", ckpt=str(last))
    last.write_bytes(bytes(data[: len(data) // 3]))  # truncated
    with pytest.raises(CheckpointError, match="cannot be read .* truncated or corrupt"):
        VerifiedCheckpointIO().load_checkpoint(last)


def test_a_checkpoint_directory_that_cannot_be_written_stops_the_run_at_its_first_save(tmp_path):
    blocked = tmp_path / "digits_precise" / "version_0" / "checkpoints"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the checkpoint directory goes")  # as root, chmod would not stop a write
    with pytest.raises(CheckpointError, match=f"could not write the checkpoint {blocked}/.*no earlier one is there"):
        _fit(tmp_path, "--trainer.logger.init_args.version", "0")
