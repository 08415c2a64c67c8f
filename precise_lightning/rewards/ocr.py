"""Flow-GRPO's OCR reward (``flow_grpo/ocr.py``): how much of the prompt's quoted text an image shows, read by an
OCR engine. The engine is a choice: :class:`RapidOCR` (the default: PaddleOCR's own PP-OCRv4 detection and
recognition models run by onnxruntime, shipped inside the ``rapidocr_onnxruntime`` wheel, so it reads offline from
a fresh install) or :class:`PaddleOCR` (Flow-GRPO's engine; its weights download on first use)."""

from __future__ import annotations

import numpy as np
import torch
from Levenshtein import distance
from torch import Tensor

from precise_lightning.rewards.remote import device_of, uint8_images
from precise_lightning.rewards.reward import Reward


def quoted_text(prompt: str) -> str:
    """The text an OCR prompt asks to render: what stands between its first two double quotes (Flow-GRPO's
    ``prompt.split('"')[1]``, ``ocr.py:31``)."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].replace(" ", ""):
        raise ValueError(f"an OCR prompt quotes the text to render in double quotes, e.g. 'a sign that says "
                         f"\"Open\"': {prompt!r} has none")
    return parts[1]


def ocr_score(recognized: str, target: str) -> float:
    """1 - Levenshtein(recognized, target) / len(target), spaces removed and lower-cased, the distance 0 when the
    target is a substring of what was read and at most len(target) (Flow-GRPO ``ocr.py:46-60``)."""
    recognized, target = recognized.replace(" ", "").lower(), target.replace(" ", "").lower()
    dist = 0 if target in recognized else min(distance(recognized, target), len(target))
    return 1 - dist / len(target)


class OCREngine:
    """Reads an image's text lines: ``read(image [H, W, 3] uint8) -> [(text, confidence), ...]``."""

    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        raise NotImplementedError


class RapidOCR(OCREngine):
    """PaddleOCR's PP-OCRv4 detection and recognition models (English and Chinese) on onnxruntime, from the
    ``rapidocr_onnxruntime`` wheel that carries them; no angle classifier, as Flow-GRPO's ``use_angle_cls=False``."""

    def __init__(self) -> None:
        from rapidocr_onnxruntime import RapidOCR as Engine

        self.engine = Engine()

    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        lines, _ = self.engine(image, use_cls=False)
        return [(text, float(confidence)) for _, text, confidence in lines or []]


class PaddleOCR(OCREngine):
    """Flow-GRPO's engine, ``PaddleOCR(use_angle_cls=False, lang="en")`` (``ocr.py:14-19``); its models download on
    first use (``pip install paddlepaddle paddleocr==2.9.1``)."""

    def __init__(self, use_gpu: bool = False) -> None:
        try:
            from paddleocr import PaddleOCR as Engine
        except ImportError as err:
            raise ImportError("the PaddleOCR engine needs paddleocr and paddlepaddle (pip install paddlepaddle "
                              "paddleocr==2.9.1), or use the default engine (RapidOCR), which needs neither") from err
        try:
            self.engine = Engine(use_angle_cls=False, lang="en", use_gpu=use_gpu, show_log=False)
        except Exception as err:  # its first use downloads the models: offline that fails inside paddleocr
            raise RuntimeError(f"PaddleOCR could not load its models ({type(err).__name__}: {err}); they download "
                               "on first use: run once with network access, or use the default engine (RapidOCR), "
                               "whose models ship in its wheel") from err

    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        result = self.engine.ocr(image, cls=False)
        return [(text, float(confidence)) for _, (text, confidence) in (result[0] or [])]


class OCRReward(Reward):
    """Text-rendering accuracy (:func:`ocr_score`) of each image against its prompt's quoted text, the lines the
    engine read with confidence > 0 joined (Flow-GRPO ``ocr.py:44``); images are rounded to uint8 RGB as Flow-GRPO's
    ``ocr_score`` hands them over (``rewards.py:100-103``)."""

    io_bound = True  # the engines run outside the GIL (onnxruntime, paddle): scored in the background thread

    def __init__(self, engine: OCREngine | None = None) -> None:
        super().__init__()
        self.engine = engine if engine is not None else RapidOCR()

    @classmethod
    def prompt_problem(cls, prompt: str) -> str | None:
        try:
            quoted_text(prompt)
        except ValueError as err:
            return str(err)
        return None

    def read_text(self, image: np.ndarray) -> str:
        return "".join(text for text, confidence in self.engine.read(image) if confidence > 0)

    def forward(self, images: Tensor | np.ndarray, prompts: list[str]) -> Tensor:
        """images [B, C, H, W] in [0, 1], or the uint8 [B, H, W, 3] the background thread hands over -> [B]."""
        scores = [ocr_score(self.read_text(np.ascontiguousarray(image)), quoted_text(prompt))
                  for image, prompt in zip(uint8_images(images), prompts)]
        return torch.tensor(scores, dtype=torch.float32, device=device_of(images))
