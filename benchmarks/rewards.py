"""Reward cost beside sampling cost: images per second of each published scorer at its real architecture (random
weights, written in the published formats and loaded through the product's own loading code), next to the
demo's rollout.

PickScore is OpenCLIP ViT-H/14 (986M parameters), HPSv2.1 the same architecture in open_clip, CLIPScore OpenAI
ViT-L/14 (428M), the aesthetic predictor an MLP on that ViT-L/14's image tower, ImageReward BLIP's ViT-L/16 with a
BERT-base text encoder reading it (about 470M); the OCR reward PaddleOCR's PP-OCRv4 detection and recognition models
on onnxruntime (CPU, the models its wheel ships; it reads images with a line of text drawn on them). Images are
512 x 512 (the recipes' resolution), prompts a GRPO batch (each repeated 8 times).
On a GPU each neural scorer also runs with bfloat16 weights. Prints a table and saves a bar chart.

    python benchmarks/rewards.py [--batch 32] [--repeats 3] [--device auto] [--out benchmarks/out] [--only NAME ...]
    python benchmarks/rewards.py --size tiny --repeats 1   # seconds: checks the script, measures nothing useful
    python benchmarks/rewards.py --dtype-error [--size tiny]  # bfloat16 weights' score error against float32

``--dtype-error`` scores the same images (smooth random images, groups of 8 per prompt) with float32 and with
bfloat16 weights and reports the error beside what GRPO learns from: the spread of scores within a prompt's group,
and the share of within-group pairs whose order bfloat16 flips.
"""

from __future__ import annotations

import argparse
import gc
import resource
import tempfile
import time
from pathlib import Path

import torch

from precise_lightning.hub import set_model_root
from precise_lightning.policies import DigitsPolicy
from precise_lightning.rewards import AestheticScore, CLIPScore, HPSv2, HPSv3, ImageReward, OCRReward, PickScore
from precise_lightning.sampling import Sampler
from precise_lightning.architectures.hpsv3 import write_hpsv3
from precise_lightning.architectures.rewards import (
    AESTHETIC_DIR, write_aesthetic, write_clip_rewards, write_hpsv2, write_imagereward,
)

# name -> build(model root, dtype)
SCORERS = {
    "PickScore (ViT-H/14)": lambda root, dtype: PickScore(dtype=dtype),
    "HPSv2.1 (ViT-H/14)": lambda root, dtype: HPSv2(dtype=dtype),
    "CLIPScore (ViT-L/14)": lambda root, dtype: CLIPScore(dtype=dtype),
    "Aesthetic (ViT-L/14 + MLP)": lambda root, dtype: AestheticScore(str(root / AESTHETIC_DIR), dtype=dtype),
    "ImageReward (BLIP ViT-L/16)": lambda root, dtype: ImageReward(dtype=dtype),
    "HPSv3 (Qwen2-VL-7B)": lambda root, dtype: HPSv3(dtype=dtype),
    "OCR (PP-OCRv4, onnxruntime)": lambda root, dtype: OCRReward(),
}
FLOAT32_ONLY = {"OCR (PP-OCRv4, onnxruntime)"}  # its engine runs its own float32 models on the CPU
GPU_ONLY_AT_REAL_SIZE = {"HPSv3 (Qwen2-VL-7B)"}
GROUP = 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _peak_gpu_gib(device: torch.device) -> float:
    """The allocator's peak since the last reset (CUDA); NaN on CPU, whose process peak is cumulative over rows."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def _weights_gib(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30


def bench_scorers(root: Path, device: torch.device, batch: int, repeats: int, names: list[str]) -> list[dict]:
    set_model_root(str(root))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, 512, 512, generator=g).to(device)
    prompts = [f'prompt number {i // GROUP}: a red fox in snow holding a sign that says "hello world {i // GROUP}"'
               for i in range(batch)]
    texts = _text_images(prompts).to(device)
    dtypes = ["float32", "bfloat16"] if device.type == "cuda" else ["float32"]
    rows = []
    for name in names:
        inputs = texts if name in FLOAT32_ONLY else images
        for dtype in dtypes if name not in FLOAT32_ONLY else ["float32"]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            scorer = SCORERS[name](root, dtype).to(device)
            load_s = time.perf_counter() - start
            seconds = _timed(lambda scorer=scorer, inputs=inputs: scorer(inputs, prompts), device, repeats)
            rows.append(dict(what=name, dtype=dtype, seconds=seconds, images_per_s=batch / seconds,
                             load_s=load_s, weights_gib=_weights_gib(scorer), peak_gib=_peak_gpu_gib(device)))
            print(f"  {name} {dtype}: {batch / seconds:.2f} images/s", flush=True)
            del scorer
            gc.collect()
    set_model_root(None)
    return rows


def _text_images(prompts: list[str]) -> torch.Tensor:
    """[B, 3, 512, 512]: each prompt's quoted text drawn in black (DejaVu Sans, 48 px) on a light random background."""
    import matplotlib
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), 48)
    rng = np.random.default_rng(0)
    images = []
    for prompt in prompts:
        image = Image.fromarray(rng.integers(170, 256, (512, 512, 3), dtype=np.uint8))
        ImageDraw.Draw(image).text((32, 232), prompt.split('"')[1], fill="black", font=font)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
    return torch.stack(images)


def dtype_error(root: Path, device: torch.device, batch: int, names: list[str]) -> None:
    """Print, per scorer, bfloat16's score error against float32 on the same images and its effect on rankings."""
    set_model_root(str(root))
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(batch, 3, 16, 16, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=512, mode="bicubic").clamp(0, 1).to(device)
    prompts = [f"prompt number {i // GROUP}: a detailed photo of a red fox in snow" for i in range(batch)]
    print("\n| scorer | max abs error | median abs error | within-group std (float32) | pairs reordered |")
    print("|---|---|---|---|---|")
    for name in names:
        scores = {}
        for dtype in ("float32", "bfloat16"):
            scorer = SCORERS[name](root, dtype).to(device)
            scores[dtype] = scorer(images, prompts).double().cpu()
            del scorer
            gc.collect()
        err = (scores["bfloat16"] - scores["float32"]).abs()
        groups = [slice(i, i + GROUP) for i in range(0, batch, GROUP)]
        spread = torch.stack([scores["float32"][s].std(unbiased=False) for s in groups]).mean()
        flipped = total = 0
        for s in groups:
            a, b = scores["float32"][s], scores["bfloat16"][s]
            order_a, order_b = (a[:, None] > a[None, :]), (b[:, None] > b[None, :])
            flipped += int((order_a != order_b).triu(1).sum())
            total += GROUP * (GROUP - 1) // 2
        print(f"| {name} | {err.max():.4g} | {err.median():.4g} | {spread:.4g} | {flipped}/{total} |", flush=True)
    set_model_root(None)


def bench_demo_rollout(device: torch.device, repeats: int) -> dict:
    """The digits demo's rollout of one iteration: 128 images, Precise, 10 steps, then decode."""
    policy = DigitsPolicy().to(device)
    sampler = Sampler("precise", eta=1.5, num_steps=10)
    prompts = [f"a handwritten digit {i % 10}" for i in range(128)]
    noise = torch.randn(128, *policy.latent_shape, device=device)

    @torch.no_grad()
    def rollout():
        cond = policy.encode(prompts)
        traj = sampler.sample(lambda x, t: policy.velocity(x, t, cond), noise, generator=None)
        return policy.decode(traj.latents[-1])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = _timed(rollout, device, repeats)
    return dict(what="demo rollout (digits, 10 steps)", dtype="float32", seconds=seconds, images_per_s=128 / seconds,
                load_s=float("nan"), weights_gib=_weights_gib(policy), peak_gib=_peak_gpu_gib(device))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['what']}\n{r['dtype']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.7 * len(rows) + 1.5))
    ax.barh(labels, [r["images_per_s"] for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("images per second (log scale)")
    ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--size", choices=["real", "tiny"], default="real", help="architectures to write and time")
    parser.add_argument("--dtype-error", action="store_true", help="measure bfloat16's score error instead of speed")
    parser.add_argument("--only", nargs="+", default=[], help="scorers whose name starts with one of these")
    args = parser.parse_args()
    names = [n for n in SCORERS if not args.only or n.startswith(tuple(args.only))]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cpu" and args.size == "real" and GPU_ONLY_AT_REAL_SIZE & set(names):
        print(f"skipped on a CPU at real size: {sorted(GPU_ONLY_AT_REAL_SIZE & set(names))} (use --size tiny)")
        names = [n for n in names if n not in GPU_ONLY_AT_REAL_SIZE]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {args.size} architectures; batch {args.batch} of 512 x 512 images; "
          f"median of {args.repeats} after a warm-up")
    with tempfile.TemporaryDirectory() as root:
        print(f"writing {args.size} random weights ...", flush=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            write_clip_rewards(Path(root), args.size)
            write_hpsv2(Path(root), args.size)
            write_aesthetic(Path(root), args.size)
        write_imagereward(Path(root), args.size)
        if any(n.startswith("HPSv3") for n in names):
            write_hpsv3(Path(root), args.size)  # 17 GB at real size: only when asked for
        if args.dtype_error:
            dtype_error(Path(root), device, args.batch, [n for n in names if n not in FLOAT32_ONLY])
            return
        rows = bench_scorers(Path(root), device, args.batch, args.repeats, names)
    rows.append(bench_demo_rollout(device, args.repeats))
    print(f"\n| what | dtype | s per {args.batch} images | images / s | load s | weights GiB | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        seconds = r["seconds"] * args.batch / (128 if r["what"].startswith("demo") else args.batch)
        print(f"| {r['what']} | {r['dtype']} | {seconds:.3g} | {r['images_per_s']:.3g} | {r['load_s']:.1f} | "
              f"{r['weights_gib']:.2f} | {r['peak_gib']:.2f} |")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    plot(rows, args.out / "rewards.png")
    print(f"\nprocess peak RSS over the whole run: {rss:.1f} GiB; plot: {args.out / 'rewards.png'}")


if __name__ == "__main__":
    main()
