"""HPSv3 parity reference: the ``hpsv3`` package's scores (``HPSv3RewardInferencer.reward``) on fixed random
weights of a small Qwen2-VL of the published layout, in its own environment.

The package pins transformers 4.45.2, so it cannot share ours; this script has two halves, one per environment
(README.md beside it says how the package environment is built)::

    python tests/reference/hpsv3_package.py write DIR                          # ours: base model files, weights
    PKG_ENV/bin/python tests/reference/hpsv3_package.py score DIR > tests/reference/hpsv3_scores.json

``tests/test_hpsv3.py`` rewrites the same weights and inputs and compares our scores with the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SEED = 0
PROMPTS = [
    "a red cat on a blue mat",
    "a red cat on a blue mat",  # the same prompt on another image: the score must follow the image
    "a photo of a dog",
    "a painting of a green dog by the sea at night with the moon and the stars over the water",
]
SIZES = [(512, 512), (300, 500)]  # (H, W): the recipes' square, and one that smart_resize must reshape


def inputs(height: int, width: int):
    """Four smooth random images [4, 3, H, W] uint8."""
    import torch

    generator = torch.Generator().manual_seed(SEED + height + width)
    coarse = torch.rand(len(PROMPTS), 3, 12, 12, generator=generator)
    fine = torch.rand(len(PROMPTS), 3, height, width, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return ((0.8 * smooth + 0.2 * fine) * 255).round().to(torch.uint8)


def write(directory: Path) -> None:
    import safetensors.torch

    from precise_lightning.architectures.hpsv3 import QWEN2_VL, write_hpsv3

    state = safetensors.torch.load_file(write_hpsv3(directory, "tiny", seed=SEED))
    # The package loads the base model's weights first (any values: HPSv3's file replaces them all), at the
    # base's vocabulary size, and resizes its embeddings to the tokenizer with <|Reward|> before loading HPSv3's.
    rows = json.loads((directory / QWEN2_VL / "config.json").read_text())["vocab_size"]
    base = {k: v for k, v in state.items() if not k.startswith("rm_head.")}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        base[key] = base[key].new_zeros(rows, base[key].shape[1])
    safetensors.torch.save_file(base, directory / QWEN2_VL / "model.safetensors", metadata={"format": "pt"})


def score(directory: Path) -> None:
    import contextlib

    import torch
    import yaml
    from PIL import Image

    with contextlib.redirect_stdout(sys.stderr):  # the package prints a flash-attention notice on import
        import hpsv3
        from hpsv3 import HPSv3RewardInferencer

    config = yaml.safe_load((Path(hpsv3.__file__).parent / "config" / "HPSv3_7B.yaml").read_text())
    config |= {"model_name_or_path": str(directory / "Qwen/Qwen2-VL-7B-Instruct"), "output_dir": str(directory),
               "bf16": False, "torch_dtype": "float32"}  # float32 on the CPU, as the test scores
    (directory / "HPSv3_tiny.yaml").write_text(yaml.safe_dump(config))
    scorer = HPSv3RewardInferencer(str(directory / "HPSv3_tiny.yaml"), str(directory / "MizzenAI/HPSv3/HPSv3.safetensors"),
                                   device="cpu")
    scores = {}
    with torch.no_grad():
        for height, width in SIZES:
            images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in inputs(height, width)]
            scores[f"{height}x{width}"] = scorer.reward(images, PROMPTS)[:, 0].tolist()  # mu, as DanceGRPO reads it
    import transformers

    json.dump({"seed": SEED, "package": "hpsv3 1.0.0", "transformers": transformers.__version__,
               "torch": torch.__version__, "scores": scores}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    {"write": write, "score": score}[sys.argv[1]](Path(sys.argv[2]))
