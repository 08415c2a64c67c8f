"""HPSv3 on transformers' Qwen2-VL: the package's scores on the same weights (tests/reference), the published
resize, inputs and pooling, the loading path and its errors."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import cli
from conftest import demo_args, run_dir, tensorboard
from precise_lightning.architectures.hpsv3 import HPSV3, HPSV3_FILE, QWEN2_VL, write_hpsv3
from precise_lightning.hub import WeightsNotFoundError
from precise_lightning.rewards import HPSv3
from precise_lightning.rewards.hpsv3 import INSTRUCTION, REWARD_TOKEN, smart_resize, split_checkpoint

REFERENCE = Path(__file__).parent / "reference"
sys.path.insert(0, str(REFERENCE))
import hpsv3_package as reference  # noqa: E402  (tests/reference/hpsv3_package.py)


@pytest.fixture(scope="module")
def published():
    return json.loads((REFERENCE / "hpsv3_scores.json").read_text())


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    root = tmp_path_factory.mktemp("hpsv3")
    reference.write(root)
    return HPSv3(str(root / HPSV3), str(root / QWEN2_VL), dtype="float32")


def test_scores_equal_the_hpsv3_package_on_the_same_weights(scorer, published):
    """The package (hpsv3 1.0.0, transformers 4.45.2, its own environment) scored these weights and inputs. Ours
    resize with torchvision's port of PIL's bicubic filter (1-2 uint8 levels off on 0.5% of pixels): 1e-3."""
    assert published["seed"] == reference.SEED
    for height, width in reference.SIZES:
        expected = torch.tensor(published["scores"][f"{height}x{width}"])
        assert (expected.max() - expected.min()) > 0.1  # the inputs tell apart by far more than the tolerance
        ours = scorer(reference.inputs(height, width).float() / 255, reference.PROMPTS)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-3)


def test_scores_equal_the_package_exactly_on_pil_resized_pixels(scorer, published):
    """512 x 512 resized by PIL as the package does (to 448 x 448, which our resize then leaves as it is): the
    rest of the steps (template, tokens, patches, positions, pooling, head) agree to float32 rounding."""
    images = reference.inputs(512, 512)
    height, width = smart_resize(512, 512)
    pil = [np.array(Image.fromarray(i.permute(1, 2, 0).numpy()).resize((width, height), Image.BICUBIC))
           for i in images]
    ours = scorer(torch.from_numpy(np.stack(pil)).permute(0, 3, 1, 2).float() / 255, reference.PROMPTS)
    torch.testing.assert_close(ours, torch.tensor(published["scores"]["512x512"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("size,expected", [((512, 512), (448, 448)), ((300, 500), (364, 588)),
                                           ((1024, 1024), (448, 448)), ((28, 28), (448, 448)),
                                           ((768, 1360), (336, 588))])
def test_smart_resize_matches_hand_computed_sizes(size, expected):
    """256 x 28 x 28 pixels: sides rounded to 28, then scaled by sqrt(pixels ratio) with floor above the target
    and ceil below it (300 x 500 -> ceil(12.39), ceil(20.66) patches of 28)."""
    assert smart_resize(*size) == expected


def test_smart_resize_refuses_extreme_aspect_ratios():
    with pytest.raises(ValueError, match="aspect ratio over 200"):
        smart_resize(10, 2100)


def test_tiny_model_loads_by_hub_id_and_pools_the_reward_token(model_root):
    """Through the model root: the text is the chat template around the published instruction with the prompt,
    one image placeholder expanded to its 256 merged patches and one reward token; the score is the head's first
    output on that token's last hidden state; another image changes it; alone equals batched (right padding)."""
    scorer = HPSv3()
    text = scorer.texts(["a red cat"])[0]
    assert INSTRUCTION.format(text_prompt="a red cat") in text and text.count(REWARD_TOKEN) == 1
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cat", "a red cat", "a painting of a blue dog by the sea at night"]
    scores = scorer(images, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores[0] != scores[1]
    batch = scorer.processor(text=scorer.texts(prompts[:1]), images=[torch.zeros(3, 448, 448, dtype=torch.uint8)],
                             return_tensors="pt")
    assert (batch["input_ids"] == scorer.model.config.image_token_id).sum() == 256
    alone = torch.cat([scorer(images[i : i + 1], prompts[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(scores, alone, rtol=0, atol=1e-5)


def test_grey_images_score_as_their_rgb_copies(model_root):
    scorer = HPSv3()
    grey = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(scorer(grey, ["a", "b"]), scorer(grey.expand(-1, 3, -1, -1), ["a", "b"]))


def test_missing_files_foreign_checkpoints_and_bad_prompts_give_clear_errors(tmp_path, tiny_root, model_root):
    with pytest.raises(WeightsNotFoundError, match="has no 'HPSv3.safetensors'.*config key `checkpoint`"):
        HPSv3(str(tmp_path))
    state = safetensors.torch.load_file(tiny_root / HPSV3 / HPSV3_FILE)
    with pytest.raises(ValueError, match="unexpected keys \\['other.weight'\\]"):
        split_checkpoint({**state, "other.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="rm_head 0 tensors"):
        split_checkpoint({k: v for k, v in state.items() if not k.startswith("rm_head.")})
    short = {k: (v[:-1] if "embed_tokens" in k else v) for k, v in state.items()}
    safetensors.torch.save_file(short, tmp_path / HPSV3_FILE)
    with pytest.raises(ValueError, match="270 token embeddings but the tokenizer .* has 271 .* set `base`"):
        HPSv3(str(tmp_path / HPSV3_FILE))
    with pytest.raises(ValueError, match="must hold <\\|Reward\\|> once"):
        HPSv3()(torch.rand(1, 3, 32, 32), [f"a cat {REWARD_TOKEN}"])


def test_writer_is_deterministic_whatever_the_global_rng(tmp_path):
    torch.manual_seed(123)
    a = safetensors.torch.load_file(write_hpsv3(tmp_path / "a", "tiny", seed=3))
    torch.manual_seed(456)
    b = safetensors.torch.load_file(write_hpsv3(tmp_path / "b", "tiny", seed=3))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_held_out_hpsv3_metric_is_one_command_line_key(tmp_path, tiny_root):
    """``--reward.metrics.hpsv3`` adds it beside a config's metrics; logged at evaluation only (digits: grey 28 x
    28 images, resized to 448 x 448 as the package would)."""
    run = cli.main(demo_args(tmp_path, "--trainer.max_steps", "2", "--data.eval_batch_size", "8",
                             "--config", "configs/heldout_metrics.yaml",
                             "--reward.metrics.hpsv3", "{class_path: precise_lightning.rewards.HPSv3}",
                             "--model_root", str(tiny_root), batch_size=16, micro_batch_size=8), run=False)
    scorer = run.trainer.callbacks[[type(c).__name__ for c in run.trainer.callbacks].index("RewardScorer")]
    assert sorted(scorer.metrics) == ["clipscore", "hpsv2", "hpsv3", "pickscore"]
    run.trainer.fit(run.model, datamodule=run.datamodule)
    tags = tensorboard(run_dir(tmp_path)).Tags()["scalars"]
    assert "eval/hpsv3" in tags and "train/reward_hpsv3" not in tags
