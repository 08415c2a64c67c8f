"""ImageReward parity reference: the ``image-reward`` package's scores on fixed random weights of the published
architecture (BLIP ViT-L/16 at 224, a two-layer text encoder of the published width), in its own environment.

The package pins timm 0.6.13 and does not import with transformers 5, so it cannot share ours; this script has
two halves, one per environment (README.md beside it says how the package environment is built)::

    python tests/reference/imagereward.py write DIR                       # ours: weights, tokenizer, inputs
    PKG_ENV/bin/python tests/reference/imagereward.py score DIR > tests/reference/imagereward_scores.json

``tests/test_imagereward.py`` rewrites the same weights and inputs and compares our scores with the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SEED, TEXT_LAYERS = 0, 2
PROMPTS = [
    "a red cat on a blue mat",
    "a red cat on a blue mat",  # the same prompt on another image: the score must follow the image
    "a photo of a dog",
    "a painting of a green dog by the sea at night with the moon and the stars over the water and a small boat "
    "with a red sail and two people in it and a lighthouse on the far shore",  # over 35 tokens: truncated
]


def inputs():
    """Four images [4, 3, 224, 224] uint8 (224: the package's resize and crop leave them as they are)."""
    import torch

    generator = torch.Generator().manual_seed(SEED + 1)
    coarse = torch.rand(len(PROMPTS), 3, 14, 14, generator=generator)
    fine = torch.rand(len(PROMPTS), 3, 224, 224, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=224, mode="bilinear", align_corners=False)
    return ((0.8 * smooth + 0.2 * fine) * 255).round().to(torch.uint8)


def write(directory: Path) -> None:
    from precise_lightning.architectures.rewards import write_imagereward

    write_imagereward(directory, "real", text_layers=TEXT_LAYERS, seed=SEED)


def score(directory: Path) -> None:
    import ImageReward.models.BLIP.blip as blip
    import torch
    from ImageReward import ImageReward
    from PIL import Image

    load = blip.BertTokenizer.from_pretrained  # the package downloads bert-base-uncased by name: ours instead
    blip.BertTokenizer.from_pretrained = lambda name, *a, **k: load(str(directory / "google-bert/bert-base-uncased"))
    weights = directory / "THUDM/ImageReward"
    model = ImageReward(med_config=str(weights / "med_config.json"), device="cpu").eval()
    loaded = model.load_state_dict(torch.load(weights / "ImageReward.pt", map_location="cpu"), strict=False)
    assert not loaded.missing_keys and not loaded.unexpected_keys, loaded
    images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in inputs()]
    with torch.no_grad():
        scores = [model.score(prompt, image) for prompt, image in zip(PROMPTS, images)]
    import transformers

    versions = {"image-reward": "1.5", "transformers": transformers.__version__, "torch": torch.__version__}
    json.dump({"scores": scores, "versions": versions, "seed": SEED, "text_layers": TEXT_LAYERS}, sys.stdout,
              indent=2)
    print()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "score"):
        sys.exit(__doc__)
    (write if sys.argv[1] == "write" else score)(Path(sys.argv[2]))
