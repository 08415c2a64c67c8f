"""PickScore, HPSv2.1 and CLIPScore on tiny random weights, loaded by hub id from the tiny model root."""

import logging

import open_clip
import pytest
import torch
from PIL import Image
from torchmetrics.functional.multimodal import clip_score
from transformers import AutoProcessor, CLIPModel, CLIPProcessor

from precise_lightning.hub import WeightsNotFoundError, set_model_root
from precise_lightning.rewards import CLIPScore, HPSv2, PickScore, PreciseCLIPScore

SCORERS = [PickScore, HPSv2, CLIPScore]
PROMPTS = ["a red cube on a table", "an astronaut riding a horse", "a red cube on a table", "a bowl of ramen"]


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 48, 40, generator=g)


@pytest.fixture(scope="module")
def scorers(tiny_root):
    set_model_root(str(tiny_root))
    try:
        return {cls: cls() for cls in SCORERS}
    finally:
        set_model_root(None)


def _assert_matches_reference(scorer, images, ref_pixels, expected, scale, monkeypatch):
    """Exact on the reference's own pixels (tokenizer, embeddings, formula); within 2e-3 of the cosine (times the
    formula's scale) through our tensor preprocessing, whose residue against PIL is at most 2 uint8 levels."""
    torch.testing.assert_close(scorer(images, PROMPTS), expected, rtol=0, atol=2e-3 * scale)
    monkeypatch.setattr(scorer.preprocess, "forward", lambda _: ref_pixels)
    torch.testing.assert_close(scorer(images, PROMPTS), expected, rtol=1e-5, atol=1e-5 * scale)


def _u8(images):
    return (images * 255).round().to(torch.uint8)


def _pil(images):
    return [Image.fromarray(i.permute(1, 2, 0).numpy()) for i in _u8(images)]


@pytest.mark.parametrize("cls", SCORERS, ids=lambda c: c.__name__)
def test_shape_dtype_finite_deterministic_and_batch_invariant(scorers, images, monkeypatch, cls):
    scorer = scorers[cls]
    scores = scorer(images, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert not scores.requires_grad
    # The invariances are checked on the cosine itself (random tiny CLIPs give negative cosines, which CLIPScore
    # clamps to 0), then the score is checked to be the formula of that cosine.
    monkeypatch.setattr(scorer, "formula", lambda cos: cos)
    cos = scorer(images, PROMPTS)
    torch.testing.assert_close(scorer(images, PROMPTS), cos, rtol=0, atol=0)
    one_by_one = torch.cat([scorer(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(one_by_one, cos, rtol=1e-5, atol=1e-6)
    assert cos[0] != cos[2] and cos.abs().max() <= 1  # same prompt, different image
    monkeypatch.undo()
    torch.testing.assert_close(scores, scorer.formula(cos))


@pytest.mark.parametrize(
    "cls,same,opposite",
    [(PickScore, "scale", "-scale"), (CLIPScore, 100.0, 0.0), (HPSv2, 1.0, -1.0)],
    ids=["PickScore", "CLIPScore", "HPSv2"],
)
def test_published_formula_on_constructed_embeddings(scorers, images, monkeypatch, cls, same, opposite):
    """Identical normalised embeddings give the formula's maximum; opposite ones its minimum; orthogonal ones cos 0."""
    scorer = scorers[cls]
    scale = scorer.model.logit_scale.exp().item() if cls is PickScore else None
    value = {"scale": scale, "-scale": -scale if scale else None}
    e = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    monkeypatch.setattr(scorer, "encode_images", lambda pixels: e[: len(pixels)].repeat(2, 1)[: len(pixels)])
    for texts, expected in [(e, value.get(same, same)), (-e, value.get(opposite, opposite))]:
        monkeypatch.setattr(scorer, "encode_texts", lambda prompts, texts=texts: 7 * texts[: len(prompts)])
        got = scorer(images[:2], ["a", "b"])
        torch.testing.assert_close(got, torch.full((2,), float(expected)))
    monkeypatch.setattr(scorer, "encode_texts", lambda prompts: e.flip(0)[: len(prompts)])
    expected_zero = 0.0  # orthogonal: cos = 0 for every formula
    torch.testing.assert_close(scorer(images[:2], ["a", "b"]), torch.full((2,), expected_zero))


def test_pickscore_equals_the_published_scoring_code(scorers, images, tiny_root, monkeypatch):
    """PickScore's reference: processor on PIL images, get_*_features, normalise, logit_scale.exp() * dot."""
    model = CLIPModel.from_pretrained(tiny_root / "yuvalkirstain/PickScore_v1").eval()
    processor = AutoProcessor.from_pretrained(tiny_root / "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    with torch.no_grad():
        pixels = processor(images=_pil(images), return_tensors="pt")["pixel_values"]
        tokens = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(**tokens).pooler_output
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        scale = model.logit_scale.exp()
        expected = scale * (img * txt).sum(-1)
    _assert_matches_reference(scorers[PickScore], images, pixels, expected, scale.item(), monkeypatch)


class _PooledFeatures(torch.nn.Module):
    """torchmetrics expects get_*_features to return tensors; transformers 5 returns model outputs."""

    def __init__(self, model, sign: float = 1.0):
        super().__init__()
        self.model, self.config, self.sign = model, model.config, sign

    def get_image_features(self, *args, **kwargs):
        return self.sign * self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_clipscore_equals_torchmetrics(scorers, images, tiny_root, monkeypatch):
    """torchmetrics' clip_score, one image at a time (it averages a batch), on the same model and processor."""
    path = tiny_root / "openai/clip-vit-large-patch14"
    model, processor = CLIPModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    scorer = scorers[CLIPScore]
    # The tiny random CLIP's cosines are mostly negative, which CLIPScore clamps to 0; flipping the image
    # embedding (on both sides) makes some positive, so both the clamp and the unclamped values are compared.
    flipped = _PooledFeatures(model, sign=-1.0)
    expected = torch.stack([
        clip_score(_u8(images[i : i + 1]), PROMPTS[i], model_name_or_path=lambda: (flipped, processor))
        for i in range(len(PROMPTS))
    ]).detach()
    assert (expected > 0).sum() >= 2 and (expected == 0).sum() >= 1
    encode = scorer.encode_images
    monkeypatch.setattr(scorer, "encode_images", lambda pixels: -encode(pixels))
    pixels = processor(images=_pil(images), return_tensors="pt")["pixel_values"]
    _assert_matches_reference(scorer, images, pixels, expected, 100.0, monkeypatch)


def test_precise_clipscore_equals_the_precise_codes_scorer(images, tiny_root):
    """The Precise code's ClipScorer, transcribed (rewards/scorers/clip.py:20-53, float input as builtin.py:52-63
    passes a tensor): T.Resize / CenterCrop / Normalize from the processor on the float tensor, CLIPModel with
    max_length padding, logits_per_image.diagonal() / 30."""
    import torchvision.transforms as T

    path = tiny_root / "openai/clip-vit-large-patch14"
    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    config = processor.image_processor.to_dict()
    tform = T.Compose([T.Resize(config["size"]["shortest_edge"]),
                       T.CenterCrop((config["crop_size"]["height"], config["crop_size"]["width"])),
                       T.Normalize(mean=processor.image_processor.image_mean, std=processor.image_processor.image_std)])
    texts = processor(text=PROMPTS, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(pixel_values=tform(images), **texts).logits_per_image.diagonal() / 30
    set_model_root(str(tiny_root))
    try:
        scorer = PreciseCLIPScore()
    finally:
        set_model_root(None)
    torch.testing.assert_close(scorer(images, PROMPTS), expected, rtol=1e-5, atol=1e-5)
    assert (expected < 0).any()  # no clamp at 0, unlike CLIPScore


def test_hpsv2_equals_the_published_scoring_code(scorers, images, tiny_root, monkeypatch):
    """HPSv2's reference: open_clip preprocess_val on PIL, its tokenizer, model(image, text), diagonal of the dot."""
    directory = tiny_root / "xswu/HPSv2"
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{directory}", load_weights=False,
                                                                 output_dict=True)
    model.load_state_dict(torch.load(directory / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    with torch.no_grad():
        pixels = torch.stack([preprocess(i) for i in _pil(images)])
        out = model(pixels, tokenizer(PROMPTS))
        expected = (out["image_features"] @ out["text_features"].T).diagonal()
    _assert_matches_reference(scorers[HPSv2], images, pixels, expected, 1.0, monkeypatch)


@pytest.mark.parametrize("cls", SCORERS, ids=lambda c: c.__name__)
def test_long_prompts_are_truncated_with_one_warning(scorers, images, caplog, cls):
    scorer = scorers[cls]
    scorer._warned_truncation = False
    long = "a very detailed painting of a lighthouse " * 20  # > 77 tokens
    with caplog.at_level(logging.WARNING):
        a = scorer(images[:2], [long, "short"])
        b = scorer(images[:2], [long + " with a cat in the corner", "short"])
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and f"{scorer.max_tokens} tokens" in warnings[0].getMessage()
    torch.testing.assert_close(a, b)  # the words past the limit are cut, so they change nothing


@pytest.mark.parametrize("cls", SCORERS, ids=lambda c: c.__name__)
def test_bfloat16_weights_give_float32_scores_close_to_float32(scorers, model_root, images, cls):
    bf16 = cls(dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    scores = bf16(images, PROMPTS)
    reference = scorers[cls](images, PROMPTS)
    assert scores.dtype == torch.float32
    scale = {PickScore: bf16.model.logit_scale.float().exp().item(), CLIPScore: 100.0, HPSv2: 1.0}[cls]
    torch.testing.assert_close(scores, reference, rtol=0, atol=0.02 * scale)  # 0.02 of cosine: bf16 rounding


def test_mismatched_lengths_fail(scorers, images):
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        scorers[HPSv2](images, PROMPTS[:3])


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: PickScore(), r"PickScore model from 'yuvalkirstain/PickScore_v1' \(config key `model`\).*HF_HUB_OFFLINE"),
        (lambda: CLIPScore(model="/no/such/dir"), r"CLIPScore model from '/no/such/dir' \(config key `model`\)"),
        (lambda: HPSv2(), r"HPSv2 checkpoint from 'xswu/HPSv2/HPS_v2.1_compressed.pt' \(config key `checkpoint`\)"),
        (lambda: HPSv2(checkpoint="/no/such/hps.pt"), r"from '/no/such/hps.pt/HPS_v2.1_compressed.pt'"),
    ],
    ids=["hub-id-offline", "missing-dir", "hps-hub-offline", "hps-missing-file"],
)
def test_missing_weights_give_one_clear_error(build, message):
    with pytest.raises(WeightsNotFoundError, match=message) as info:
        build()
    assert "hf download" in str(info.value) and "set `" in str(info.value)


def test_model_root_that_lacks_a_model_names_it(tmp_path):
    set_model_root(str(tmp_path))
    try:
        with pytest.raises(WeightsNotFoundError, match=f"nor under model_root '{tmp_path}'"):
            PickScore()
    finally:
        set_model_root(None)
    with pytest.raises(FileNotFoundError, match="model_root '/no/such/root' is not a directory"):
        set_model_root("/no/such/root")


def test_hpsv2_directory_without_the_file_and_unknown_architecture(tmp_path, model_root):
    with pytest.raises(WeightsNotFoundError, match=r"has no 'HPS_v2.1_compressed.pt' \(config key `checkpoint`\)"):
        HPSv2(checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Q-99'"):
        HPSv2(architecture="ViT-Q-99")


def test_local_paths_load_without_the_model_root(tiny_root, scorers, images):
    """A local directory (or file) in the config loads directly, the same weights as through the root."""
    direct = HPSv2(checkpoint=str(tiny_root / "xswu/HPSv2/HPS_v2.1_compressed.pt"))
    pick = PickScore(model=str(tiny_root / "yuvalkirstain/PickScore_v1"),
                     processor=str(tiny_root / "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"))
    torch.testing.assert_close(direct(images, PROMPTS), scorers[HPSv2](images, PROMPTS), rtol=0, atol=0)
    torch.testing.assert_close(pick(images, PROMPTS), scorers[PickScore](images, PROMPTS), rtol=0, atol=0)


def test_jpeg_rewards_are_the_size_of_the_quality_95_jpeg_in_kilobytes():
    """By hand with PIL: a flat image compresses to far fewer bytes than noise; compressibility is -kB / 500."""
    import io

    from PIL import Image

    from precise_lightning.rewards import JPEGCompressibility, JPEGIncompressibility

    images = torch.stack([torch.full((3, 64, 64), 0.5), torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))])
    expected = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(buffer, format="JPEG", quality=95)
        expected.append(buffer.tell() / 1000)
    sizes = JPEGIncompressibility()(images, ["a", "b"])
    torch.testing.assert_close(sizes, torch.tensor(expected))
    assert sizes[1] > 5 * sizes[0]
    torch.testing.assert_close(JPEGCompressibility()(images, ["a", "b"]), -torch.tensor(expected) / 500)
    gray = JPEGIncompressibility()(images[:, :1], ["a", "b"])  # one channel (the digits demo): saved as grayscale
    assert gray.shape == (2,) and gray[1] > gray[0]


def test_aesthetic_score_equals_the_published_scoring_steps(tiny_root, images, monkeypatch):
    """The predictor's reference steps: CLIPProcessor on PIL images, get_image_features, unit-normalise, the MLP
    loaded from the checkpoint file. Prompts play no part."""
    from precise_lightning.rewards import AestheticScore
    from precise_lightning.rewards.aesthetic import CHECKPOINT, aesthetic_mlp

    checkpoint = tiny_root / "improved-aesthetic-predictor"
    scorer = AestheticScore(checkpoint=str(checkpoint), clip=str(tiny_root / "openai/clip-vit-large-patch14"))
    model = CLIPModel.from_pretrained(tiny_root / "openai/clip-vit-large-patch14").eval()
    processor = AutoProcessor.from_pretrained(tiny_root / "openai/clip-vit-large-patch14")
    head = aesthetic_mlp(model.config.projection_dim)
    head.load_state_dict(torch.load(checkpoint / CHECKPOINT, weights_only=True))
    head.eval()
    with torch.no_grad():
        pixels = processor(images=_pil(images), return_tensors="pt")["pixel_values"]
        embed = model.get_image_features(pixel_values=pixels).pooler_output
        expected = head.layers(embed / embed.norm(dim=-1, keepdim=True)).squeeze(1)
    scores = scorer(images, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and len(set(scores.tolist())) == 4
    torch.testing.assert_close(scores, scorer(images, ["other words"] * 4), rtol=0, atol=0)
    torch.testing.assert_close(scores, expected, rtol=0, atol=2e-3 * expected.abs().max())  # tensor vs PIL resize
    monkeypatch.setattr(scorer.preprocess, "forward", lambda _: pixels)
    torch.testing.assert_close(scorer(images, PROMPTS), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(WeightsNotFoundError, match="improved-aesthetic-predictor and give its path"):
        AestheticScore(checkpoint="/no/such/file.pth")


def test_rewards_score_in_their_own_dtype_under_the_training_autocast(scorers, images):
    """Scoring runs inside training_step, under bf16-mixed's autocast: the scorer turns it off for the rewards."""
    from precise_lightning.callbacks.rewards import _score_all

    models = {cls.__name__: scorers[cls] for cls in SCORERS}
    plain, _ = _score_all(models, images, PROMPTS, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under, _ = _score_all(models, images, PROMPTS, None)
        raw = scorers[PickScore](images, PROMPTS)
    for name in models:
        assert torch.equal(under[name], plain[name]), name
    assert not torch.equal(raw, plain["PickScore"])  # autocast does act on the bare model
