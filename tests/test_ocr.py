"""The OCR reward: Flow-GRPO's score on given recognised strings (its edge cases), its prompt format, and the
default engine reading text drawn with PIL (no mock: the PP-OCRv4 models in the rapidocr wheel)."""

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from Levenshtein import distance
from PIL import Image, ImageDraw, ImageFont

from conftest import ROOT
from precise_lightning.rewards.ocr import OCRReward, PaddleOCR, ocr_score, quoted_text

FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"  # DejaVu, shipped with matplotlib (a dependency)


def _flow_grpo_reward(recognized_text: str, prompt: str) -> float:
    """flow_grpo/ocr.py:46-60 transcribed (the recognised text already joined)."""
    recognized_text = recognized_text.replace(" ", "").lower()
    prompt = prompt.replace(" ", "").lower()
    if prompt in recognized_text:
        dist = 0
    else:
        dist = distance(recognized_text, prompt)
    if dist > len(prompt):
        dist = len(prompt)
    return 1 - dist / (len(prompt))


@pytest.mark.parametrize("recognized,target", [
    ("hello world", "Hello World"),  # case and spaces
    ("a sign: HELLOWORLD!!", "hello world"),  # a substring is exact
    ("helo wrld", "hello world"),  # two deletions
    ("", "hello world"),  # nothing read
    ("completely different words on a long long sign", "hi"),  # capped at the target's length
    ("hello", "hello world"),  # a prefix
])
def test_score_is_flow_grpo_s(recognized, target):
    assert ocr_score(recognized, target) == pytest.approx(_flow_grpo_reward(recognized, target), abs=0)


def test_prompts_parse_as_flow_grpo_s():
    """Flow-GRPO's own OCR prompts (data/ocr/test.txt): the quoted text is its ``prompt.split('"')[1]``."""
    prompts = [line.strip() for line in (ROOT / "data/ocr/test.txt").read_text().splitlines() if line.strip()]
    assert len(prompts) == 1018  # the test split's size, as config/grpo.py's comment on it says
    assert all(quoted_text(p) == p.split('"')[1] for p in prompts)
    for bad in ["a sign without quotes", 'an empty sign ""', 'a dangling "quote']:
        with pytest.raises(ValueError, match="double quotes"):
            quoted_text(bad)
        assert OCRReward.prompt_problem(bad)


def _drawn(text: str, font: ImageFont.FreeTypeFont, width: int = 512, height: int = 160) -> torch.Tensor:
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).text((16, height // 3), text, fill="black", font=font)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def reward():
    return OCRReward()


@pytest.mark.parametrize("font,size", [("DejaVuSans.ttf", 48), ("DejaVuSerif.ttf", 40), ("DejaVuSansMono.ttf", 32)])
def test_drawn_text_scores_near_one_with_its_prompt_and_low_with_another(reward, font, size):
    image = _drawn("hello world", ImageFont.truetype(str(FONTS / font), size))
    images = torch.stack([image, image, torch.ones_like(image)])
    scores = reward(images, ['a sign that says "hello world"', 'a sign that says "Spring Sale 2024"',
                             'a blank sign that says "hello world"'])
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert scores[0] >= 0.9 and scores[1] <= 0.3 and scores[2] == 0, scores


def test_paddleocr_engine_names_what_to_install():
    with pytest.raises(ImportError, match="paddleocr.*or use the default engine"):
        PaddleOCR()


@pytest.mark.slow
def test_ocr_recipe_trains_two_iterations_on_the_tiny_model(tmp_path, model_root):
    import cli
    from conftest import run_dir, scalars

    run = cli.main(["--config", "configs/sd35_precise.yaml", "--config", "configs/sd35_ocr.yaml", "--config",
                    "configs/tiny_cpu.yaml", "--model_root", str(model_root), "--data.train_file",
                    "configs/prompts/ocr_smoke.txt", "--data.eval_file", "configs/prompts/ocr_smoke.txt",
                    "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"],
                   run=False)
    assert run.model.hparams.beta == 0.04
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step == 4
    logged = scalars(run_dir(tmp_path))
    # the tiny model draws no text: every score 0 (each group flat, so no update: the plumbing is what runs here)
    assert logged["train/reward_ocr"] == [0.0, 0.0] and logged["eval/reward_ocr"] == [0.0, 0.0]
    assert "eval/pickscore" in logged
