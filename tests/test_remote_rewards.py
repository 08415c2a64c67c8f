"""Remote rewards against fake servers on 127.0.0.1: the GenEval reward-server protocol and an OpenAI-compatible
VLM judge. Normal replies, a 500 then success, a timeout, a malformed reply and a server that is down each give the
documented behaviour; a missing score becomes NaN: that image gets advantage 0 and leaves its group's statistics."""

import base64
import io
import logging
import math
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from conftest import demo_args, run_dir, scalars
from precise_lightning.callbacks import RewardScorer
from precise_lightning.callbacks.rewards import BACKGROUND_MICRO_BATCHES
from precise_lightning.rewards import DigitClassifierReward, GenEvalReward, RemoteRewardError, Reward, UnifiedReward
from precise_lightning.rewards.remote import uint8_images
from precise_lightning.rewards.unified_reward import INSTRUCTION, parse_scores
from reward_servers import decoded, serving

IMAGES = torch.nn.functional.interpolate(  # smooth: their JPEGs stay close to them
    torch.rand(5, 3, 3, 4, generator=torch.Generator().manual_seed(0)), size=(24, 32), mode="bilinear")
PROMPTS = ["a cat", "two dogs", "a red car", "a cat", "a bench left of a tree"]
TAGS = ["single_object", "two_object", "colors", "single_object", "position"]
META = [{"tag": t, "include": [{"class": "x", "count": 1}], "fake_score": s}
        for t, s in zip(TAGS, [1.0, 0.5, 0.0, 1.0, 0.25])]


def _free_port_url() -> str:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_geneval_sends_the_published_request_and_reads_scores_and_per_tag_accuracies():
    with serving("geneval") as a, serving("geneval") as b:
        reward = GenEvalReward([a.url, b.url], batch_size=2, max_in_flight=2)
        scores, details = reward(IMAGES, PROMPTS, META)
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.5, 0.0, 1.0, 0.25]))
    assert len(a.requests) == 2 and len(b.requests) == 1  # 3 batches of <= 2, URLs in turn
    (first,) = [r for r in a.requests if [m["prompt"] for m in r["meta_datas"]] == PROMPTS[:2]]
    assert first["only_strict"] is True
    image = decoded(first["images"][0])
    assert image.size == (32, 24) and image.mode == "RGB"
    sent = torch.tensor(np.array(image)).permute(2, 0, 1).float() / 255
    assert (sent - IMAGES[0]).abs().mean() < 0.02  # a JPEG of this image
    torch.testing.assert_close(details["strict_accuracy"], torch.tensor([1.0, 1, 0, 1, 0]))
    assert details["accuracy"].isnan().all()  # only_strict: the server does not compute it
    single = details["single_object_strict_accuracy"]
    assert single[[0, 3]].tolist() == [1.0, 1.0] and single[[1, 2, 4]].isnan().all()  # -10: other tags
    assert set(details) == set(GenEvalReward.detail_names)


def test_geneval_refuses_prompts_without_geneval_metadata():
    with pytest.raises(ValueError, match="needs GenEval metadata.*'two dogs'.*jsonl"):
        GenEvalReward("http://127.0.0.1:1")(IMAGES[:2], PROMPTS[:2], [META[0], {}])


def test_server_error_is_retried_then_succeeds():
    with serving("geneval", script=lambda n: "500" if n == 1 else "ok") as fake:
        scores, _ = GenEvalReward(fake.url, backoff=0.01)(IMAGES, PROMPTS, META)
    assert len(fake.requests) == 2 and not scores.isnan().any()


def test_timeout_retries_then_names_the_url_and_the_failure():
    with serving("geneval", script=lambda n: "slow", slow_s=1.0) as fake:
        with pytest.raises(RemoteRewardError, match=rf"{fake.url} failed 2 times, last: no reply within timeout=0.2"):
            GenEvalReward(fake.url, timeout=0.2, retries=1, backoff=0.0)(IMAGES, PROMPTS, META)
    assert len(fake.requests) == 2


def test_server_that_is_down_fails_with_the_url_once_retries_are_spent():
    url = _free_port_url()
    with pytest.raises(RemoteRewardError, match=rf"{url}/v1/chat/completions failed 3 times, last: connection failed"):
        UnifiedReward(url, retries=2, backoff=0.01)(IMAGES[:1], PROMPTS[:1])


def test_client_errors_are_not_retried():
    with serving("judge", script=lambda n: "404") as fake:
        with pytest.raises(RemoteRewardError, match=r"refused the request \(HTTP 404: RuntimeError: out of memory\)"):
            UnifiedReward(fake.url, retries=3)(IMAGES[:1], PROMPTS[:1])
    assert len(fake.requests) == 1


def test_malformed_geneval_reply_gives_nan_and_a_warning_naming_the_url(caplog):
    with serving("geneval", script=lambda n: "garbage" if n == 2 else "ok") as fake:
        with caplog.at_level(logging.WARNING):
            scores, details = GenEvalReward(fake.url, batch_size=2)(IMAGES, PROMPTS, META)
    assert scores[[0, 1, 4]].tolist() == [1.0, 0.5, 0.25] and scores[[2, 3]].isnan().all()
    assert details["strict_accuracy"][[2, 3]].isnan().all()
    assert f"unusable reply from {fake.url}" in caplog.text and "advantage 0" in caplog.text


def test_judge_sends_the_published_request_and_weighs_the_parsed_parts(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret")
    with serving("judge") as fake:
        scores, parts = UnifiedReward(fake.url + "/v1/", model="UnifiedReward-qwen", api_key_env="JUDGE_KEY")(
            IMAGES[:2], PROMPTS[:2])
        weighted, _ = UnifiedReward(fake.url, weights={"alignment": 2, "style": 1, "coherence": 0})(
            IMAGES[:1], PROMPTS[:1])
    torch.testing.assert_close(scores, torch.full((2,), (0.8 + 1.0 + 0.6) / 3))
    torch.testing.assert_close(parts["style"], torch.full((2,), 0.6))
    torch.testing.assert_close(weighted, torch.tensor([(2 * 0.8 + 0.6) / 3]))
    # the first call's two requests go out together: find the first image's by its caption
    (request,) = [r for r in fake.requests[:2] if r["messages"][0]["content"][1]["text"].endswith("[a cat]")]
    assert request["path"] == "/v1/chat/completions" and request["model"] == "UnifiedReward-qwen"
    assert request["temperature"] == 0 and request["max_tokens"] == 256 and request["auth"] == "Bearer secret"
    assert fake.requests[2]["auth"] == "Bearer EMPTY"  # no key configured: as published for a local server
    image_part, text_part = request["messages"][0]["content"]
    assert text_part["text"] == INSTRUCTION.format(prompt="a cat")
    assert text_part["text"].endswith("Text Caption: [a cat]")
    header, data = image_part["image_url"]["url"].split(",", 1)
    assert header == "data:image/jpeg;base64"
    assert Image.open(io.BytesIO(base64.b64decode(data))).size == (512, 512)


@pytest.mark.parametrize("answer,expected", [
    ("Alignment Score (1-5): 4\nCoherence Score (1-5): 5\nStyle Score (1-5): 3", (0.8, 1.0, 0.6)),
    ("Alignment Score (1-5): 7\nCoherence Score (1-5):0\nStyle Score (1-5): 2.5", (1.0, 0.0, 0.5)),  # clamped
    ("Alignment Score (1-5): 4\nCoherence Score (1-5): 5", None),  # a part missing
    ("I cannot judge this image.", None),
])
def test_judge_answers_parse_as_published(answer, expected):
    parsed = parse_scores(answer)
    assert (parsed is None) if expected is None else tuple(parsed.values()) == pytest.approx(expected)


def test_unparsable_judge_answer_gives_nan_never_a_sentinel(caplog):
    with serving("judge") as fake:
        with caplog.at_level(logging.WARNING):
            scores, parts = UnifiedReward(fake.url)(IMAGES[:2], ["a cat", "say:no scores here"])
    assert scores[0] == pytest.approx(0.8) and math.isnan(scores[1]) and parts["alignment"][1].isnan()
    assert "1 of 2 answers hold no parsable scores" in caplog.text and "'no scores here'" in caplog.text


def test_requests_in_flight_are_bounded_over_concurrent_calls():
    """Two micro-batches scored at once (two threads) share the reward's bound."""
    with serving("judge", script=lambda n: "slow", slow_s=0.15) as fake:
        reward = UnifiedReward(fake.url, max_in_flight=2)
        calls = [threading.Thread(target=reward, args=(IMAGES, PROMPTS)) for _ in range(2)]
        for call in calls:
            call.start()
        for call in calls:
            call.join()
    assert len(fake.requests) == 10 and fake.max_in_flight == 2


@pytest.mark.parametrize("build,message", [
    (lambda: GenEvalReward("127.0.0.1:18085"), "http:// or https:// URLs"),
    (lambda: GenEvalReward([]), "http:// or https:// URLs"),
    (lambda: UnifiedReward("http://h", timeout=0), "timeout > 0"),
    (lambda: UnifiedReward("http://h", weights={"beauty": 1}), "weights of \\['alignment'"),
    (lambda: UnifiedReward("http://h", api_key_env="NO_SUCH_VARIABLE_SET"), "NO_SUCH_VARIABLE_SET is not set"),
])
def test_bad_settings_fail_at_construction(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_scorer_logs_details_under_the_reward_and_trains_on_the_score_alone():
    with serving("judge") as fake:
        scorer = RewardScorer({"judge": UnifiedReward(fake.url)}, metrics={"vlm": UnifiedReward(fake.url)})
        total, components = scorer.score(IMAGES[:2], PROMPTS[:2])
        held_out = scorer.evaluate(IMAGES[:2], PROMPTS[:2])
    assert scorer.component_names() == ["judge", "judge/alignment", "judge/coherence", "judge/style"]
    assert list(components) == scorer.component_names() and list(held_out) == scorer.metric_names()
    torch.testing.assert_close(total, components["judge"])


def test_missing_score_gives_that_image_advantage_zero_and_training_goes_on(tmp_path):
    """The demo trained on a judge served over HTTP: the second rollout has one unparsable answer. As the Precise code
    treats its -10 sentinel (stat_tracking.py:17-49), that image gets advantage 0 and leaves its group's statistics;
    the update runs (a NaN from a reward that cannot abstain would skip it: tests/test_faults.py)."""
    run = cli.main(demo_args(tmp_path, "--trainer.val_check_interval", "1000", "--model.eval_at_start", "false",
                             "--trainer.max_steps", "6", "--model.max_bad_iterations", "2"), run=False)
    scorer = next(cb for cb in run.trainer.callbacks if isinstance(cb, RewardScorer))
    advantages = []
    original = run.model._advantages

    def recording(*args):
        out = original(*args)
        advantages.append(out[0])
        return out

    run.model._advantages = recording
    unscored = []
    log = run.model.log
    run.model.log = lambda key, value, **k: (unscored.append(float(value)) if key == "train/unscored_images"
                                            else None) or log(key, value, **k)
    with serving("judge", script=lambda n: "garbage" if n == 40 else "ok") as fake:  # rollout 2 of 32 images each
        scorer.rewards = {"judge": UnifiedReward(fake.url, max_in_flight=4)}
        scorer.weights = {"judge": 1.0}
        run.trainer.fit(run.model, datamodule=run.datamodule)
    assert len(fake.requests) == 3 * 32 and run.trainer.global_step == 6 and run.model.guard.skipped == 0
    assert unscored == [0.0, 1.0, 0.0]
    assert torch.isfinite(advantages[1]).all() and (advantages[1] == 0).sum() >= 1
    assert "train/reward_judge/alignment" in run.trainer.callback_metrics


def test_klein_geneval_recipe_smoke_runs_against_a_fake_server(tmp_path, model_root):
    """The GenEval recipe on the tiny models, GenEval-format prompts with metadata, a fake GenEval server: the
    metadata reaches the server, training and evaluation log the scores and per-tag accuracies."""
    with serving("geneval") as fake:
        run = cli.main([
            "--config", "configs/flux2_klein_precise.yaml", "--config", "configs/flux2_klein_geneval.yaml",
            "--config", "configs/tiny_cpu.yaml", "--model_root", str(model_root),
            "--data.train_file", "configs/prompts/geneval_smoke_train.jsonl",
            "--data.eval_file", "configs/prompts/geneval_smoke_eval.jsonl", "--data.eval_batch_size", "2",
            "--reward.rewards.geneval.init_args.urls", fake.url, "--trainer.max_steps", "2",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        ], run=False)
        run.trainer.fit(run.model, datamodule=run.datamodule)
    sent = [m for r in fake.requests for m in r["meta_datas"]]
    tags = {m["tag"] for m in sent}  # one iteration trains 2 of the 4 train prompts; evaluation scores both
    assert {"position", "color_attr"} <= tags and len(tags & {"single_object", "two_object", "counting", "colors"}) == 2
    assert all(m["prompt"] and "include" in m for m in sent)
    logged = scalars(run_dir(tmp_path))
    for tag in ["train/reward_geneval", "train/reward_geneval/strict_accuracy", "eval/reward_geneval",
                "eval/reward_geneval/position_strict_accuracy"]:
        assert tag in logged and all(math.isfinite(v) for v in logged[tag]), tag
    assert "train/reward_geneval/accuracy" not in logged  # only_strict on rollouts: the server does not compute it
    assert "eval/reward_geneval/accuracy" in logged  # evaluation asks for GenEval's own accuracy, as published
    assert {r["only_strict"] for r in fake.requests} == {True, False}


class SlowDigitReward(Reward):
    """The demo's reward as a server would give it: ``io_bound``, scored from uint8 pixels as every remote client
    does, a set wait per call; records its threads."""

    io_bound = True

    def __init__(self, inner: torch.nn.Module, wait_s: float) -> None:
        super().__init__()
        self.inner, self.wait_s, self.threads, self.calls = inner, wait_s, set(), []

    def forward(self, images, prompts):
        self.threads.add(threading.current_thread().name)
        self.calls.append(len(prompts))
        time.sleep(self.wait_s)
        pixels = torch.from_numpy(uint8_images(images)[..., :1].copy()).permute(0, 3, 1, 2)  # grey digits
        return self.inner(pixels.float() / 255, prompts)


def test_overlapped_scoring_gives_the_same_rewards_and_update_as_sequential(tmp_path):
    """Micro-batches of 8 (4 per rollout); the io-bound reward scores in the background when overlap is on, in the
    training thread when off: the logged rewards and the trained weights are identical."""
    results = {}
    for overlap in (False, True):
        run = cli.main(demo_args(tmp_path / str(overlap), "--trainer.val_check_interval", "1000",
                                 "--model.eval_at_start", "false", "--trainer.max_steps", "4", micro_batch_size=8),
                       run=False)
        scorer = next(cb for cb in run.trainer.callbacks if isinstance(cb, RewardScorer))
        slow = SlowDigitReward(scorer.rewards["digit"], wait_s=0.02)
        scorer.rewards, scorer.overlap = {"digit": slow}, overlap
        run.trainer.fit(run.model, datamodule=run.datamodule)
        weights = {n: p.detach().clone() for n, p in run.model.policy.named_trainable_parameters()}
        results[overlap] = weights, scalars(run_dir(tmp_path / str(overlap)))["train/reward"], slow.threads
    (w_off, r_off, t_off), (w_on, r_on, t_on) = results[False], results[True]
    assert t_off == {"MainThread"} and all(t.startswith("reward") for t in t_on)
    assert r_on == r_off and len(r_on) == 2
    assert all(torch.equal(w_on[n], w_off[n]) for n in w_off)


def test_closing_a_round_drops_the_micro_batches_not_yet_scored():
    """What a rollout that fails midway does: the scoring threads do not go on with the micro-batches waiting."""
    slow = SlowDigitReward(DigitClassifierReward(), wait_s=0.3)
    n = 2 * BACKGROUND_MICRO_BATCHES
    scoring = RewardScorer({"digit": slow}).start_round([f"a handwritten digit {i % 10}" for i in range(n)])
    images = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for i in range(n):
        scoring.submit(slice(i, i + 1), images[i : i + 1])
    start = time.perf_counter()
    scoring.close()
    assert time.perf_counter() - start < 0.2  # does not wait for the micro-batches in flight
    time.sleep(0.5)
    assert len(slow.calls) <= BACKGROUND_MICRO_BATCHES  # at most those in flight; the rest were dropped
