"""ImageReward on transformers' BLIP: the package's scores on the same weights (tests/reference), the published
preprocessing, the loading path and its errors."""

import json
import sys
from pathlib import Path

import pytest
import torch

from precise_lightning.hub import WeightsNotFoundError
from precise_lightning.rewards import ImageReward
from precise_lightning.rewards.imagereward import CHECKPOINT, MEAN, STD, split_checkpoint
from precise_lightning.architectures.rewards import BERT, IMAGEREWARD, write_imagereward

REFERENCE = Path(__file__).parent / "reference"
sys.path.insert(0, str(REFERENCE))
import imagereward as reference  # noqa: E402  (tests/reference/imagereward.py)


@pytest.mark.slow
def test_scores_equal_the_image_reward_package_on_the_same_weights(tmp_path):
    """The package (image-reward 1.5, transformers 4.40, its own environment) scored these weights and inputs; the
    file holds its scores (tests/reference/README.md). Weights: published ViT-L/16, text encoder cut to 2 layers."""
    published = json.loads((REFERENCE / "imagereward_scores.json").read_text())
    assert (published["seed"], published["text_layers"]) == (reference.SEED, reference.TEXT_LAYERS)
    reference.write(tmp_path)
    scorer = ImageReward(str(tmp_path / IMAGEREWARD), str(tmp_path / BERT))
    ours = scorer(reference.inputs().float() / 255, reference.PROMPTS)
    expected = torch.tensor(published["scores"])
    assert (expected.max() - expected.min()) > 0.1  # the inputs tell apart by far more than the tolerance
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_tiny_model_loads_by_hub_id_and_scores_as_its_parts(model_root, monkeypatch):
    """Through the model root; the score is the MLP of the text encoder's [CLS] feature over the image's tokens,
    standardised with the published mean and std; a different image changes it."""
    scorer = ImageReward()
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cat", "a red cat", "a dog on a mat"]
    scores = scorer(images, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores[0] != scores[1]
    pixels = scorer.preprocess(images)
    assert pixels.shape[-1] == scorer.vision.config.image_size
    embeds = scorer.vision(pixel_values=pixels).last_hidden_state
    tokens = scorer.tokenizer(prompts, padding="max_length", max_length=35, return_tensors="pt")
    assert tokens["input_ids"][0, 0] == scorer.tokenizer.cls_token_id
    hidden = scorer.text(**{k: tokens[k] for k in ("input_ids", "attention_mask")}, encoder_hidden_states=embeds,
                         is_decoder=False).last_hidden_state[:, 0]
    torch.testing.assert_close(scores, (scorer.mlp.layers(hidden).squeeze(1) - MEAN) / STD)


def test_prompt_padding_does_not_change_the_score(model_root):
    """Each prompt alone (no batch padding effects) scores as in the batch."""
    scorer = ImageReward()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = ["a cat", "a painting of a blue dog by the sea"]
    together = scorer(images, prompts)
    alone = torch.cat([scorer(images[i : i + 1], prompts[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_missing_files_and_foreign_checkpoints_give_clear_errors(tmp_path, tiny_root):
    with pytest.raises(WeightsNotFoundError, match="has no 'ImageReward.pt'.*config key `model`"):
        ImageReward(str(tmp_path))
    state = torch.load(tiny_root / IMAGEREWARD / CHECKPOINT, weights_only=True)
    with pytest.raises(ValueError, match="unexpected keys \\['other.weight'\\]"):
        split_checkpoint({**state, "other.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="mlp 0 tensors"):
        split_checkpoint({k: v for k, v in state.items() if not k.startswith("mlp.")})


def test_writer_is_deterministic_whatever_the_global_rng(tmp_path):
    torch.manual_seed(123)
    write_imagereward(tmp_path / "a", "tiny", seed=3)
    torch.manual_seed(456)
    write_imagereward(tmp_path / "b", "tiny", seed=3)
    a, b = (torch.load(tmp_path / d / IMAGEREWARD / CHECKPOINT, weights_only=True) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
