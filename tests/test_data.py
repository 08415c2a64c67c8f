"""Prompt files, group collation, the DataModule's checks and group integrity across ranks."""

import json

import pytest
import torch

from precise_lightning.data import PromptDataModule, read_prompts
from precise_lightning.data.digits import parse_digit
from precise_lightning.data.prompts import GroupCollate
from precise_lightning.data.sampler import GlobalBatchSampler, ResumableLoader


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_read_txt_and_jsonl(tmp_path):
    assert read_prompts(_write(tmp_path, "p.txt", ["a cat", "", "  a dog  "])) == [{"prompt": "a cat"}, {"prompt": "a dog"}]
    rows = [json.dumps({"prompt": "a cat", "tags": ["animal"]}), json.dumps({"prompt": "a car"})]
    assert read_prompts(_write(tmp_path, "p.jsonl", rows))[0] == {"prompt": "a cat", "tags": ["animal"]}


@pytest.mark.parametrize(
    "name,lines,message",
    [
        ("empty.txt", ["", "  "], "has no prompts"),
        ("bad.jsonl", ["{not json"], r"bad.jsonl:1: not valid JSON"),
        ("noprompt.jsonl", [json.dumps({"text": "x"})], 'needs a string "prompt" field'),
        ("blank.jsonl", [json.dumps({"prompt": "a"}), json.dumps({"prompt": "  "})], "blank.jsonl:2: empty prompt"),
    ],
)
def test_bad_prompt_files(tmp_path, name, lines, message):
    with pytest.raises(ValueError, match=message):
        read_prompts(_write(tmp_path, name, lines))


def test_missing_directory_and_non_utf8_prompt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: check data.train_file"):
        PromptDataModule(train_file=str(tmp_path / "nope.txt"))
    with pytest.raises(IsADirectoryError, match=f"prompt file '{tmp_path}' is a directory: check data.train_file"):
        PromptDataModule(train_file=str(tmp_path))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a café on a street\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"prompt file '{latin1}' is not UTF-8 text .*data.train_file"):
        PromptDataModule(train_file=str(latin1))


def test_group_collate():
    batch = GroupCollate(3)([{"index": 4, "prompt": "a", "k": 1}, {"index": 9, "prompt": "b"}])
    assert batch["prompts"] == ["a"] * 3 + ["b"] * 3
    assert batch["group_ids"].tolist() == [4, 4, 4, 9, 9, 9]
    assert batch["sample_ids"].tolist() == [12, 13, 14, 27, 28, 29]
    assert batch["metadata"][0] == {"k": 1} and batch["metadata"][3] == {}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(group_size=1), r"group_size must be >= 2"),
        (dict(group_size=8, batch_size=30), r"batch_size \(30\) must be a positive multiple of group_size \(8\): e.g. 32"),
        (dict(group_size=8, batch_size=4), r"batch_size \(4\) must be a positive multiple"),
        (dict(eval_batch_size=10, eval_repeats=4), r"eval_batch_size \(10\) must be a positive multiple"),
        (dict(group_size=2, batch_size=40), "cannot fill one batch of 20 prompts"),
    ],
)
def test_datamodule_rejects_bad_values(tmp_path, kwargs, message):
    train = _write(tmp_path, "t.txt", [f"prompt {i}" for i in range(12)])
    with pytest.raises(ValueError, match=message):
        PromptDataModule(train_file=train, **kwargs)


def test_eval_split_is_disjoint_and_deterministic(tmp_path):
    train = _write(tmp_path, "t.txt", [f"prompt {i}" for i in range(20)])
    a = PromptDataModule(train_file=train, group_size=2, batch_size=4, eval_fraction=0.25)
    b = PromptDataModule(train_file=train, group_size=2, batch_size=4, eval_fraction=0.25)
    assert len(a.eval_records) == 5 and len(a.train_records) == 15
    assert a.eval_records == b.eval_records
    assert not {r["prompt"] for r in a.eval_records} & {r["prompt"] for r in a.train_records}


def _rank_loaders(train, world, group_size=4, batch_size=8):
    dm = PromptDataModule(train_file=train, group_size=group_size, batch_size=batch_size)
    loader = dm.train_dataloader()  # the single-process loader; rank r of `world` gets the same with its sampler
    return [
        ResumableLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn,
                        sampler=GlobalBatchSampler(len(loader.dataset), loader.batch_size, world, rank))
        for rank in range(world)
    ]


@pytest.mark.parametrize("world", [2, 3])
def test_global_batches_do_not_depend_on_the_number_of_ranks(tmp_path, world):
    """Rank r's batch b is chunk r of global batch b; one rank with a world-times larger batch sees the union."""
    train = _write(tmp_path, "t.txt", [f"prompt {i}" for i in range(25)])
    single = [b["prompts"] for b in _rank_loaders(train, 1, batch_size=8 * world)[0]]
    per_rank = [[b["prompts"] for b in loader] for loader in _rank_loaders(train, world)]
    assert len(single) == 25 // (2 * world) and all(len(p) == len(single) for p in per_rank)
    for b, prompts in enumerate(single):
        assert prompts == sum((per_rank[r][b] for r in range(world)), [])
    for loader in _rank_loaders(train, world):
        for batch in loader:
            ids, counts = torch.unique(batch["group_ids"], return_counts=True)
            assert (counts == 4).all() and len(ids) == 2  # whole groups, one prompt per group id
    first = [b["prompts"] for b in _rank_loaders(train, 1, batch_size=8 * world)[0]]
    assert first == single  # deterministic
    loader = _rank_loaders(train, 1, batch_size=8 * world)[0]
    loader.sampler.set_epoch(1)
    assert [b["prompts"] for b in loader] != single  # reshuffled per epoch


def test_loader_resumes_mid_epoch_and_only_in_that_epoch(tmp_path):
    train = _write(tmp_path, "t.txt", [f"prompt {i}" for i in range(20)])
    (loader,) = _rank_loaders(train, 1)
    loader.sampler.set_epoch(3)
    full = [b["prompts"] for b in loader]
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    assert state == {"epoch": 3, "batches": 2}
    (resumed,) = _rank_loaders(train, 1)
    resumed.load_state_dict(state)
    assert [b["prompts"] for b in resumed] == full[2:]
    assert resumed.state_dict() == {"epoch": 3, "batches": len(full)}
    resumed.sampler.set_epoch(4)
    assert len(list(resumed)) == len(full)  # the next epoch starts from its beginning


def test_eval_prompts_must_divide_among_processes(tmp_path):
    class Trainer:  # what the DataModule reads from Lightning's trainer
        distributed_sampler_kwargs = {"num_replicas": 3, "rank": 0}

    train = _write(tmp_path, "t.txt", [f"prompt {i}" for i in range(12)])
    dm = PromptDataModule(train_file=train, eval_file=_write(tmp_path, "e.txt", ["e0", "e1"]), group_size=2,
                          batch_size=4)
    dm.trainer = Trainer()
    with pytest.raises(ValueError, match="2 evaluation prompts do not divide among 3 processes"):
        dm.setup("fit")


def test_too_few_prompts_for_all_ranks(tmp_path):
    train = _write(tmp_path, "t.txt", [f"prompt {i}" for i in range(5)])
    with pytest.raises(ValueError, match=r"5 training prompts cannot fill one global batch of 6 prompts \(2 per rank"):
        _rank_loaders(train, 3)


def test_val_loader_repeats(tmp_path):
    train = _write(tmp_path, "t.txt", [f"prompt {i}" for i in range(8)])
    ev = _write(tmp_path, "e.txt", ["e0", "e1", "e2"])
    dm = PromptDataModule(train_file=train, eval_file=ev, group_size=2, batch_size=4, eval_batch_size=4, eval_repeats=2)
    batches = list(dm.val_dataloader())
    assert [b["prompts"] for b in batches] == [["e0", "e0", "e1", "e1"], ["e2", "e2"]]
    assert batches[1]["sample_ids"].tolist() == [4, 5]


def test_parse_digit():
    assert parse_digit("a handwritten digit 7") == 7
    assert parse_digit("The number Seven") == 7
    assert parse_digit("a 3, the digit three") == 3
    for bad in ("a cat", "digits 1 and 2", "a 17"):
        with pytest.raises(ValueError, match="exactly one digit"):
            parse_digit(bad)


def test_cached_models_leave_the_global_rng_alone(tmp_path, monkeypatch):
    """A run must not depend on whether the base model was trained in-process or loaded from the cache."""
    from precise_lightning.policies import DigitsPolicy
    from precise_lightning.rewards import DigitClassifierReward

    monkeypatch.setenv("PRECISE_LIGHTNING_CACHE", str(tmp_path))
    draws = []
    for _ in range(2):  # first pass trains and caches, second loads
        torch.manual_seed(123)
        policy = DigitsPolicy(hidden=16, pretrain_steps=3)
        DigitClassifierReward(epochs=1)
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), draws[0])  # and it is the state the caller left
    assert len(list(tmp_path.glob("*.pt"))) == 2 and policy.latent_shape == (1, 8, 8)
