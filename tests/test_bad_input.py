"""The README's table of bad inputs, run as written: each gets its one ``error:`` paragraph and exit status 2, no
traceback, and those marked "parse" before any model is built. Beside it: the help is short, and the checks that
the table cannot show (a directory this user cannot write, the sampler-noise warning)."""

import re
import shlex
import warnings

import pytest

import cli
from conftest import ROOT
from precise_lightning.cli_checks import check_writable_dir
from precise_lightning.sampling import Sampler
from precise_lightning.sampling.grids import SD3Grid


def _table() -> list[tuple[str, str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("#### Bad input and what it gets"):]
    rows = re.findall(r"^\| `(.+?)` \| `(.+?)`.*? \| ([\w ,]+) \|$", section.split("\n\n| Command")[1].split("\n\n")[0],
                      flags=re.M)
    assert len(rows) >= 12, rows
    return rows


@pytest.mark.parametrize("command,message,when", _table(), ids=lambda v: v[:60] if " " in v else None)
def test_each_bad_input_of_the_readme_gets_its_message(tmp_path, monkeypatch, capsys, command, message, when):
    (tmp_path / "A_FILE").write_text("a file, not a directory")
    (tmp_path / "BAD_YAML").write_text("a: [1, 2\n b: }\n")
    (tmp_path / "TEXT.ckpt").write_text("not a checkpoint")
    args = [str(tmp_path / a) if a in ("A_FILE", "BAD_YAML", "MISSING.ckpt", "TEXT.ckpt") else a
            for a in shlex.split(command)]
    if when == "parse":
        monkeypatch.setattr("precise_lightning.policies.digits.DigitsFlowNet",
                            lambda *a, **k: pytest.fail("a model was built before the check"))
    with pytest.raises(SystemExit) as exit_info:
        cli.run(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert "Traceback" not in err and message in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(err.strip().splitlines()) <= 3, err


def test_help_lists_rewards_not_every_module(capsys):
    with pytest.raises(SystemExit):
        cli.main(["fit", "--help"])
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 1000
    assert "precise_lightning.rewards.PickScore" in out and "torch.nn.Linear" not in out


def test_a_directory_this_user_cannot_write_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("precise_lightning.cli_checks.os.access", lambda path, mode: False)  # root writes anywhere
    with pytest.raises(PermissionError, match=f"save_dir '{tmp_path}/logs': {tmp_path} cannot be written"):
        check_writable_dir(str(tmp_path / "logs"), "save_dir")


def test_noise_that_swamps_most_steps_warns_naming_them():
    # flow_sde (Flow-GRPO's step): std = eta sqrt(t / (1 - t)) sqrt(t - t_next), with t_next in 1 - t at t = 1
    sampler = Sampler("flow_sde", eta=3.0, num_steps=10)
    t = sampler.timesteps.tolist()
    hand = [i for i in sampler.sde_steps
            if 3.0 * (t[i] / (1 - (t[i + 1] if t[i] == 1 else t[i]))) ** 0.5 * (t[i] - t[i + 1]) ** 0.5 > t[i + 1]]
    swamped, _ = sampler.swamped_steps()
    assert swamped == hand and len(hand) > 4
    with pytest.warns(UserWarning, match=r"rule 'flow_sde', eta 3.0\): its noise exceeds the next noise level on "
                                         rf"steps {re.escape(str(hand))}"):
        sampler.warn_if_swamped()
    for rule in ("precise", "precise_2m", "flow_sde", "dance_sde", "cps", "dance_precise"):  # defaults: no warning
        for grid in (None, SD3Grid()):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                Sampler(rule, num_steps=10, grid=grid).warn_if_swamped()
