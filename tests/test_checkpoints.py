"""Checkpoint files are never half-written and never silently wrong: a save that fails midway leaves the previous
file whole and stops the run at once; a changed byte in a tensor is caught on load, naming the newest intact
checkpoint; a directory that cannot be written stops the run at its first save."""

import os
import re
import shutil

import pytest
import torch

import cli
from conftest import demo_args, run_dir
from precise_lightning.checkpoint_io import CheckpointError, VerifiedCheckpointIO
from precise_lightning.resume import saved_config


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


def _small_checkpoints(directory, names):
    io = VerifiedCheckpointIO()
    for i, name in enumerate(names):
        io.save_checkpoint({"global_step": i, "state_dict": {"w": torch.full((64,), float(i))}}, directory / name)
        os.utime(directory / name, (1_000 + i, 1_000 + i))  # written in this order
    return [directory / n for n in names]


def test_corrupt_neighbours_are_checked_not_searched_from(tmp_path):
    good, bad1, bad2 = _small_checkpoints(tmp_path, ["good.ckpt", "bad1.ckpt", "bad2.ckpt"])
    for bad in (bad1, bad2):
        bad.write_bytes(bad.read_bytes()[:100])  # two truncated files: each one's search met the other (recursion)
    with pytest.raises(CheckpointError, match=f"newest intact checkpoint beside it is {good}"):
        VerifiedCheckpointIO().load_checkpoint(bad2)
    good.unlink()
    with pytest.raises(CheckpointError, match="No intact checkpoint is beside it"):
        VerifiedCheckpointIO().load_checkpoint(bad2)


def test_a_full_disk_reported_by_torch_as_runtime_error_is_clean_and_leaves_no_temp_file(tmp_path, monkeypatch):
    (last,) = _small_checkpoints(tmp_path, ["last.ckpt"])
    before = last.read_bytes()

    def disk_full(obj, f):  # what torch's zip writer raises when a write hits ENOSPC
        f.write(before[:100])
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr("precise_lightning.checkpoint_io.torch.save", disk_full)
    with pytest.raises(CheckpointError, match="could not write the checkpoint .*file write failed.*previous one is "
                                              "intact. Free space"):
        VerifiedCheckpointIO().save_checkpoint({"global_step": 9}, last)
    assert last.read_bytes() == before and not list(tmp_path.glob(".*tmp"))


def test_an_explicit_checkpoint_is_the_same_resume_as_last_and_the_command_line_wins(tmp_path, monkeypatch):
    _fit(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    changed = ["--trainer.max_steps", "8", "--trainer.val_check_interval", "1", "--model.beta", "0.05",
               "--model.micro_batch_size", "8", "--data.eval_repeats", "4"]
    messages = []
    for log_dir, ckpt in ((tmp_path / "a", str(run_dir(tmp_path / "a") / "checkpoints" / "last.ckpt")),
                          (tmp_path / "b", "last")):
        with pytest.warns(UserWarning) as caught:
            run = cli.main(["fit", *demo_args(log_dir, *changed), "--ckpt_path", ckpt])
        (message,) = [str(w.message) for w in caught if str(w.message).startswith("--ckpt_path")]
        messages.append(message.replace(str(log_dir), "<run>"))
        assert (run.model.hparams.beta, run.model.hparams.micro_batch_size) == (0.05, 8)  # not the saved 0.0 and 16
        assert run.trainer.global_step == 8
    assert messages[0] == messages[1]
    assert re.search(r"changing training \(the resumed run will not give the numbers of an uninterrupted one\):\n"
                     r"    model.beta: 0.0 -> 0.05\n    model.micro_batch_size: 16 -> 8\n"
                     r"  changing evaluation and logging only \(training resumes exactly\):\n"
                     r"    data.eval_repeats: 2 -> 4$", messages[0]), messages[0]
    last = run_dir(tmp_path / "a") / "checkpoints" / "last.ckpt"
    truncated = last.parent / "copy.ckpt"
    truncated.write_bytes(last.read_bytes()[:1000])
    monkeypatch.setattr("precise_lightning.policies.digits.DigitsFlowNet",
                        lambda *a, **k: pytest.fail("a model was built before the check"))
    with pytest.raises(CheckpointError, match=f"{truncated} cannot be read .*newest intact checkpoint beside it is "
                                              f"{last}"):
        cli.main(["fit", *demo_args(tmp_path / "a"), "--ckpt_path", str(truncated)])


def test_a_sharded_checkpoint_directory_is_read_from_its_metadata(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory without meta.pt: not a sharded checkpoint"):
        saved_config(tmp_path)
    torch.save({"global_step": 4, "config": "model:\n  beta: 0.0\n"}, tmp_path / "meta.pt")  # as FSDP2 writes it
    assert saved_config(tmp_path) == ({"model": {"beta": 0.0}}, True)


def test_a_file_read_once_is_checked_again_once_it_changes(tmp_path):
    (path,) = _small_checkpoints(tmp_path, ["last.ckpt"])
    VerifiedCheckpointIO().load_checkpoint(path)  # verified (as at parse time), then changed on disk
    data = bytearray(path.read_bytes())
    at = data.find(torch.zeros(64).numpy().tobytes())
    data[at : at + 4] = torch.ones(1).numpy().tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        VerifiedCheckpointIO().load_checkpoint(path)
