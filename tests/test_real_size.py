"""The recipes' models at their published sizes, on the meta device (no memory, no download): parameter counts
against the published weights' sizes, the recipes' LoRA counts against a hand count, FSDP2 shard units, frozen parts
without gradients or optimizer state, and the plan command on a tiny recipe."""

import json
import subprocess
import sys

import pytest
import torch
from jsonargparse import Namespace
from torch import nn

import cli
from conftest import ROOT
from precise_lightning import hub
from precise_lightning.callbacks import RewardScorer
from precise_lightning.plan import build_policy, parse, plan
from precise_lightning.plan.memory import FrozenAwareMemTracker
from precise_lightning.plan.rewards import PUBLISHED, reward_parameters
from precise_lightning.rewards import CLIPScore, HPSv3, PickScore
from precise_lightning.policies import Flux2KleinPolicy, SD3Policy

# Published figures: each component's weights file(s) as listed in the hub repository (decimal GB, 3 significant
# figures; bfloat16 / float16: 2 bytes a value). The file holds the state dict: parameters and persistent buffers
# (SD3's 384 x 384 position embedding is a buffer).
SD35_FILES_GB = {"transformer": 4.94, "text_encoder": 0.247, "text_encoder_2": 1.39,
                 "text_encoder_3": 4.99 + 4.53, "vae": 0.168}  # stabilityai/stable-diffusion-3.5-medium
KLEIN_FILES_GB = {"transformer": 7.75, "text_encoder": 4.97 + 3.08, "vae": 0.168}  # black-forest-labs/FLUX.2-klein-*-4B
# The exact counts of our builds, pinned so that a change to the published configs in the repo shows.
SD35_PARAMETERS = {"transformer": 2_243_171_520, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840,
                   "text_encoder_3": 4_762_310_656, "vae": 83_819_683}
KLEIN_PARAMETERS = {"transformer": 3_875_544_576, "text_encoder": 4_022_468_096, "vae": 84_046_115}


def _stored_values(module: nn.Module) -> int:
    """Values a weights file holds: the state dict (parameters and persistent buffers), a tied tensor once."""
    return sum({id(t): t.numel() for t in module.state_dict(keep_vars=True).values()}.values())


@pytest.fixture(scope="module")
def pipelines():
    with torch.device("meta"):
        return {"sd35": SD3Policy.build("real"), "klein": Flux2KleinPolicy.build("real")}


@pytest.mark.parametrize("name, files, counts", [("sd35", SD35_FILES_GB, SD35_PARAMETERS),
                                                 ("klein", KLEIN_FILES_GB, KLEIN_PARAMETERS)])
def test_real_size_models_match_the_published_weights(pipelines, name, files, counts):
    pipe = pipelines[name]
    for component, gb in files.items():
        module = getattr(pipe, component)
        # the listed sizes are rounded to 3 significant figures: within 0.5% (the shards' sum, twice that)
        assert 2 * _stored_values(module) / 1e9 == pytest.approx(gb, rel=0.005), component
        assert sum(p.numel() for p in module.parameters()) == counts[component], component


def test_real_size_reward_models_match_the_hub_figures():
    """The hub's model pages: PickScore_v1 (OpenCLIP ViT-H/14) 986M parameters, CLIP ViT-L/14 428M."""
    with torch.device("meta"):
        assert round(PUBLISHED[PickScore]() / 1e6) == 986
        assert round(PUBLISHED[CLIPScore]() / 1e6) == 428


def test_hpsv3_at_real_size_is_qwen2_vl_7b_with_its_model_card_size(monkeypatch):
    """Qwen2-VL-7B-Instruct's model page: 8.29B parameters. HPSv3's reward holds those less ``lm_head``, with
    151,658 embedding rows (151,657 tokens and <|Reward|>) for 152,064, and its 3.7M-parameter ranknet head; a plan
    counts it in bfloat16 (its default on a GPU) when its weights are not here."""
    hidden, base_rows, rows = 3584, 152064, 151658
    head = hidden * 1024 + 1024 + 1024 * 16 + 16 + 16 * 2 + 2
    with torch.device("meta"):
        count = PUBLISHED[HPSv3]()
    base = count - head + (base_rows - rows) * hidden + base_rows * hidden  # + lm_head
    assert round(base / 1e7) == 829
    monkeypatch.setattr(hub, "_model_root", None)  # no weights here, whatever an earlier in-process run set
    assert reward_parameters(Namespace(class_path="precise_lightning.rewards.HPSv3")) == (count, 2 * count)


def _lora_by_hand_sd35(r: int = 32, d: int = 1536, blocks: int = 24) -> int:
    # 8 square projections a block (q, k, v, out and their context twins); the last block (context_pre_only)
    # has no to_add_out
    return r * 2 * d * (8 * blocks - 1)


def _lora_by_hand_klein(r: int = 16, d: int = 3072, mlp: int = 9216, double: int = 5, single: int = 20) -> int:
    square = 8 * r * 2 * d  # the double block's attention: q, k, v, out and their context twins
    ff = 2 * (r * (d + 2 * mlp) + r * (mlp + d))  # SwiGLU in (to 2 x mlp) and out, for image and context streams
    fused = r * (d + 3 * d + 2 * mlp)  # the single block's fused QKV + MLP input projection
    return double * (square + ff) + single * fused


def _lora_by_hand_flux1(r: int = 128, d: int = 3072) -> int:
    """DanceGRPO's to_q / to_k / to_v / to_out.0: four square projections per double block (19), the three of q,
    k, v per single block (38), which have no to_out."""
    return 19 * 4 * r * 2 * d + 38 * 3 * r * 2 * d


def _lora_by_hand_qwen_image(r: int = 64, d: int = 3072, mlp: int = 4 * 3072) -> int:
    """Flow-GRPO's twelve targets per block (60): eight square attention projections, both streams' MLPs."""
    return 60 * (8 * r * 2 * d + 4 * r * (d + mlp))


@pytest.fixture(scope="module")
def recipes():
    return {name: build_policy(parse(["--config", f"configs/{name}.yaml"]))
            for name in ("sd35_precise", "flux2_klein_precise", "flux1_dev_hpsv2", "qwen_image_pickscore")}


@pytest.mark.slow  # real-size models (meta)
@pytest.mark.parametrize("name, by_hand, blocks", [("sd35_precise", _lora_by_hand_sd35(), 24),
                                                   ("flux2_klein_precise", _lora_by_hand_klein(), 5 + 20),
                                                   ("flux1_dev_hpsv2", _lora_by_hand_flux1(), 19 + 38),
                                                   ("qwen_image_pickscore", _lora_by_hand_qwen_image(), 60)])
def test_recipe_lora_counts_shard_units_and_frozen_parts_at_real_size(recipes, name, by_hand, blocks):
    policy = recipes[name]
    assert policy.device.type == "meta"
    trainable = dict(policy.named_trainable_parameters())
    assert sum(p.numel() for p in trainable.values()) == by_hand
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    units = policy.shard_units(policy.denoiser)
    assert len(units) == blocks and all("Block" in type(u).__name__ for u in units)
    for component in policy.frozen:  # text encoders and VAE: no gradient, so no optimizer state
        assert not any(p.requires_grad for p in getattr(policy, component).parameters()), component
    assert policy.reference_denoiser is None  # LoRA: the reference is the base with adapters off, no copy
    optimizer = torch.optim.AdamW(policy.trainable_parameters())
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == by_hand


@pytest.mark.slow  # real-size models (meta)
def test_text_encoder_dtype_in_a_plan_is_the_recipes(recipes):
    """SD3.5: float16, with T5's feed-forward outputs kept float32 as from_pretrained keeps them; Klein: bfloat16
    (the GPU default)."""
    t5 = recipes["sd35_precise"].text_encoder_3
    assert next(t5.parameters()).dtype == torch.float16
    assert {p.dtype for n, p in t5.named_parameters() if ".wo." in n} == {torch.float32}
    assert next(recipes["flux2_klein_precise"].text_encoder.parameters()).dtype == torch.bfloat16
    assert next(recipes["sd35_precise"].vae.parameters()).dtype == torch.float32


@pytest.mark.slow
def test_plan_of_a_tiny_recipe_as_json_says_what_to_change_when_it_does_not_fit(model_root):
    out = subprocess.run(
        [sys.executable, "-m", "precise_lightning.plan", "--config", "configs/sd35_precise.yaml", "--config",
         "configs/tiny_cpu.yaml", "--model_root", str(model_root), "--devices", "1", "--gpu-memory-gb", "0.02",
         "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["fits"] is False and 0.018 < result["peak_gb"] < 1 and result["advice"]
    assert result["trainable_parameters"] == sum(v for k, v in result["parameters"].items() if k == "lora")
    assert {"denoiser weights (frozen base)", "LoRA adapters", "text_encoder_3", "vae", "reward: pickscore",
            "gradients (float32)", "optimizer state (AdamW, 2 x float32)"} <= set(result["components"])
    assert result["peak_gb"] >= sum(result["components"].values())


@pytest.mark.slow
def test_plan_shows_what_text_encoders_off_the_gpu_save(model_root):
    args = ["--config", "configs/sd35_precise.yaml", "--config", "configs/tiny_cpu.yaml", "--model_root", str(model_root)]
    result = plan(args, 1, 80)
    offloaded = plan([*args, "--model.policy.init_args.offload_text_encoders", "true"], 1, 80)
    text = sum(result["components"][c] for c in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    assert not {"text_encoder", "text_encoder_2", "text_encoder_3"} & set(offloaded["components"])
    assert sum(offloaded["components"].values()) == pytest.approx(sum(result["components"].values()) - text, abs=2e-3)


@pytest.mark.slow
def test_gpu_acceptance_script_runs_on_the_cpu_with_tiny_models(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--recipes", "sd35", "--iterations",
                           "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["recipes"]
    assert [r["recipe"] for r in rows] == ["sd35"]
    assert all(r["ratio_drift_first"] == 0 and r["update_s"] > 0 and r["plan_peak_gb"] > 0 for r in rows)


class _FitTracker(FrozenAwareMemTracker):
    """MemTracker refuses a root module's second call (its per-module statistics are per iteration); over a whole fit
    only the device totals are read, so the previous call's per-module statistics are dropped."""

    def _pre_fw_hook(self, module, inputs):
        roots = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
        if module in self.memory_tracking and not self._mod_tracker.is_bw and roots == {"Global"}:
            del self.memory_tracking[module]
        return super()._pre_fw_hook(module, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/sd35_precise.yaml"])  # Klein: the same, by hand (the README), 157 s
def test_plan_peak_equals_the_peak_measured_on_real_tensors_within_10_percent(tmp_path, model_root, config):
    """The tiny recipe planned, then trained for two iterations under torch's MemTracker on the CPU (weights of
    models that never run, the held-out metrics without evaluation, registered up front as they sit in memory)."""
    args = ["--config", config, "--config", "configs/tiny_cpu.yaml", "--model_root", str(model_root),
            "--trainer.limit_val_batches", "0", "--model.eval_at_start", "false", "--trainer.callbacks", "[]",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
            "--trainer.max_steps", "1", "--model.updates_per_rollout", "1", "--data.batch_size", "4",
            "--model.micro_batch_size", "4"]  # one micro-batch, one update: the tracker slows a fit some 20 times
    result = plan(args, 1, 80)
    assert result["fits"] and result["advice"] == []
    predicted = result["peak_bytes"]
    run = cli.main(args, run=False)
    scorer = next(c for c in run.trainer.callbacks if isinstance(c, RewardScorer))
    tracker = _FitTracker()
    tracker.track_external(run.model, *scorer.rewards.values(), *scorer.metrics.values())
    with tracker:
        run.trainer.fit(run.model, datamodule=run.datamodule)
    measured = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    print(f"{config}: plan {predicted} bytes, measured {measured} bytes")
    assert predicted == pytest.approx(measured, rel=0.10), (predicted, measured)


@pytest.mark.slow  # real-size models (meta)
@pytest.mark.parametrize("name, billions", [("flux1_dev_hpsv2", 12), ("qwen_image_pickscore", 20)])
def test_transcribed_transformers_have_their_model_cards_sizes(recipes, name, billions):
    """FLUX.1-dev's card: "a 12 billion parameter rectified flow transformer"; Qwen-Image's: "a 20B MMDiT". Their
    configs were transcribed without a download: a wrong width or depth would show here."""
    base = [p for n, p in recipes[name].pipeline.transformer.named_parameters() if "lora_" not in n]
    assert round(sum(p.numel() for p in base) / 1e9) == billions
