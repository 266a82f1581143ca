"""efddpm.eval's metrics against their references on fixed inputs: each number is re-derived here from its
published definition (numpy/torch formulas written in this file) and computed by the reference's library as
PnPInversion's evaluation calls it; pretrained weights are replaced by small random networks, the same on both
sides. What needs the `eval` extra (torchmetrics, transformers) is skipped where it is not installed."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import efddpm.eval as ev
from efddpm.app.datasets import decode_pie_mask
from efddpm.core.checks import InputError

try:
    import torchmetrics  # noqa: F401
    HAS_TORCHMETRICS = True
except ImportError:
    HAS_TORCHMETRICS = False
needs_torchmetrics = pytest.mark.skipif(not HAS_TORCHMETRICS, reason="torchmetrics (efddpm[eval]) is not installed")

H, W = 40, 48
RLES = {"box": [10 * W + 12, 20, 11 * W + 12, 20, 12 * W + 12, 20, 13 * W + 12, 20],  # a block of 4 rows
        "runs past the end": [H * W - 30, 100],
        "nothing but the border": []}


def pictures(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random source [3, H, W] uint8 and an edit of it: the source plus noise, so SSIM is far from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(0, 256, (3, H, W), generator=g)
    edit = (source + torch.randint(-40, 41, (3, H, W), generator=g)).clamp(0, 255)
    return source.to(torch.uint8), edit.to(torch.uint8)


# ------------------------------------------------------------------------- re-derivations of the definitions

def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """The normalized 2-D Gaussian window of SSIM (Wang et al. 2004): g g^T, g_i ~ exp(-(i - c)^2 / 2 sigma^2)."""
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    return np.outer(g, g)


def ssim_by_definition(x: np.ndarray, y: np.ndarray, c1=0.01 ** 2, c2=0.03 ** 2) -> float:
    """Mean SSIM over the valid windows of each channel of two [3, H, W] float64 images with peak 1."""
    w = gaussian_window()
    local = lambda a: np.einsum("chwij,ij->chw", np.lib.stride_tricks.sliding_window_view(a, w.shape, axis=(1, 2)), w)
    mx, my = local(x), local(y)
    vx, vy, cxy = local(x * x) - mx ** 2, local(y * y) - my ** 2, local(x * y) - mx * my
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def background_by_definition(source, edit, rle) -> dict[str, float]:
    """PSNR, MSE, SSIM of source * R and edit * R in [0, 1], R = 1 - the decoded mask, in float64."""
    region = 1.0 - decode_pie_mask(rle, (H, W))                   # [H, W]
    x = source.numpy().astype(np.float64) / 255 * region         # [3, H, W]
    y = edit.numpy().astype(np.float64) / 255 * region
    mse = float(((x - y) ** 2).mean())
    return {"psnr": 10 * math.log10(1 / mse), "mse": mse, "ssim": ssim_by_definition(x, y)}


def background_as_pie_bench_calls_torchmetrics(source, edit, rle) -> dict[str, float]:
    """torchmetrics' metric objects called as PnPInversion's MetricsCalculator calls them: HWC float32 arrays
    / 255 times the HWC mask, then [1, 3, H, W] (PSNR, SSIM) or [3, H, W] (MSE). SSIM's map is taken and its
    5-pixel border left out, as torchmetrics did before 1.5 (the published numbers)."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
    from torchmetrics.regression import MeanSquaredError
    mask = 1 - decode_pie_mask(rle, (H, W)).astype(np.float32)[:, :, None].repeat(3, axis=2)
    x = source.permute(1, 2, 0).numpy().astype(np.float32) / 255 * mask
    y = edit.permute(1, 2, 0).numpy().astype(np.float32) / 255 * mask
    x, y = torch.tensor(x).permute(2, 0, 1), torch.tensor(y).permute(2, 0, 1)
    _, full = StructuralSimilarityIndexMeasure(data_range=1.0, return_full_image=True)(x[None], y[None])
    return {"psnr": float(PeakSignalNoiseRatio(data_range=1.0)(x[None], y[None])),
            "mse": float(MeanSquaredError()(x.contiguous(), y.contiguous())),
            "ssim": float(full[..., 5:-5, 5:-5].mean())}


# ------------------------------------------------------------------------------------- background metrics

@needs_torchmetrics
@pytest.mark.parametrize("name", RLES)
def test_background_scores_equal_the_definitions_and_torchmetrics(name):
    source, edit = pictures()
    ours = ev.background_scores(source, edit, ev.unedited_region(RLES[name], (H, W)))
    for reference in (background_by_definition(source, edit, RLES[name]),
                      background_as_pie_bench_calls_torchmetrics(source, edit, RLES[name])):
        assert ours.keys() == reference.keys()
        for metric in ours:
            assert ours[metric] == pytest.approx(reference[metric], rel=2e-5, abs=1e-7), metric


@needs_torchmetrics
def test_only_the_unedited_region_counts():
    """An edit that changes only the edited region and the border (the reference's rule) preserves the background
    perfectly; one that changes a background pixel does not."""
    source, _ = pictures()
    region = ev.unedited_region(RLES["box"], (H, W))
    edit = torch.where(region.bool(), source, 255 - source)
    assert ev.background_scores(source, edit, region) == {"psnr": math.inf, "mse": 0.0, "ssim": 1.0}
    edit[:, H // 2, W // 2 + 20] ^= 0x80                          # one background pixel
    assert ev.background_scores(source, edit, region)["mse"] == pytest.approx(3 * (128 / 255) ** 2 / (3 * H * W))


@needs_torchmetrics
def test_without_an_unedited_pixel_every_background_score_is_nan():
    source, edit = pictures()
    scores = ev.background_scores(source, edit, ev.unedited_region([0, H * W], (H, W)))
    assert all(math.isnan(v) for v in scores.values())


@needs_torchmetrics
def test_images_and_regions_are_checked():
    source, edit = pictures()
    with pytest.raises(InputError, match="same size"):
        ev.background_scores(source, edit[:, :-1], np.ones((H, W)))
    with pytest.raises(InputError, match=r"must be \[H, W\]"):
        ev.background_scores(source, edit, np.ones((H, W + 1)))
    with pytest.raises(InputError, match="only 0 and 1"):
        ev.background_scores(source, edit, np.full((H, W), 0.5))


def test_reported_numbers_carry_pie_benchs_factors():
    assert ev.as_reported({"structure_distance": 0.012, "psnr": 27.0, "lpips": 0.05, "mse": 0.003, "ssim": 0.85,
                           "clip": 25.0}) == pytest.approx(
        {"structure_distance": 12.0, "psnr": 27.0, "lpips": 50.0, "mse": 30.0, "ssim": 85.0, "clip": 25.0})


# ------------------------------------------------------------------------------------- optional libraries

def test_efddpm_and_efddpm_eval_import_neither_torchmetrics_nor_transformers():
    code = ("import sys, efddpm, efddpm.eval; "
            "print(sorted(m for m in ('torchmetrics', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchmetrics", "transformers")]:
        monkeypatch.setitem(sys.modules, name, None)               # `import torchmetrics...` fails
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    source, edit = pictures()
    for metric in (lambda: ev.background_scores(source, edit, np.ones((H, W))), lambda: ev.CLIPScorer.load()):
        with pytest.raises(InputError) as e:
            metric()
        assert 'pip install "efddpm[eval]"' in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ CLIP score

PROMPTS = ["a photo of a cat", "a watercolor painting of a red house by the sea", "a dog", "two birds on a wire"]


class AsTransformers4(torch.nn.Module):
    """The CLIPModel as transformers 4 handed it to torchmetrics: get_image_features and get_text_features
    return the embedding tensor (transformers 5 returns a model output, which torchmetrics 1.9 cannot read)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        out = self.model.get_image_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, *args, **kwargs):
        out = self.model.get_text_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def torchmetrics_clip_score(folder, images, prompts) -> list[float]:
    """torchmetrics' CLIPScore on the same model, called as PnPInversion calls it: one uint8 [3, H, W] image and
    its prompt at a time."""
    import transformers
    from torchmetrics.multimodal import CLIPScore
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    processor = transformers.CLIPProcessor.from_pretrained(folder)
    metric = CLIPScore(model_name_or_path=lambda: (AsTransformers4(model), processor))
    return [float(metric(image, prompt).detach()) for image, prompt in zip(images, prompts)]


def clip_images(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, 40 + 4 * k, 36), generator=g).to(torch.uint8) for k in range(n)]


@needs_torchmetrics
def test_clip_score_equals_torchmetrics_on_the_same_model(clip_folder):
    images = clip_images()
    ours = ev.CLIPScorer.load(clip_folder)(images, PROMPTS)
    reference = torchmetrics_clip_score(clip_folder, images, PROMPTS)
    assert ours.tolist() == pytest.approx(reference, abs=1e-4)
    assert min(reference) == 0 < max(reference)       # the clamp at 0 and a positive score are both exercised


def test_clip_score_is_100_times_the_cosine_of_the_projected_towers(clip_folder):
    """E_I: the vision tower's pooled output through visual_projection; E_C: the text tower's (end-of-text
    token) through text_projection; score = max(100 cos, 0), per pair."""
    import transformers
    scorer = ev.CLIPScorer.load(clip_folder)
    model, processor = scorer.model, transformers.CLIPProcessor.from_pretrained(clip_folder)
    images = clip_images()
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        e_i = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).double()
        tokens = processor(text=PROMPTS, return_tensors="pt", padding=True)
        e_c = model.text_projection(model.text_model(**tokens).pooler_output).double()
    cos = (e_i @ e_c.T).diagonal() / (e_i.norm(dim=1) * e_c.norm(dim=1))
    assert scorer(images, PROMPTS).tolist() == pytest.approx((100 * cos).clamp(min=0).tolist(), abs=1e-4)


@needs_torchmetrics
def test_edited_region_clip_score_scores_image_times_mask(clip_folder):
    """PnPInversion: np.uint8(image * mask) with the HWC mask of the edited region, then CLIPScore."""
    images, rles = clip_images(2), [[5 * 36 + 3, 200], []]
    masks = [decode_pie_mask(rle, tuple(image.shape[1:])) for rle, image in zip(rles, images)]
    masked = [torch.tensor(np.uint8(image.permute(1, 2, 0).numpy() * m[:, :, None].repeat(3, axis=2))).permute(2, 0, 1)
              for image, m in zip(images, masks)]
    regions = [ev.edited_region(rle, tuple(image.shape[1:])) for rle, image in zip(rles, images)]
    prompts = [PROMPTS[3]] * 2                            # the prompt whose scores are not clamped
    scorer = ev.CLIPScorer.load(clip_folder)
    ours, whole = scorer.on_region(images, prompts, regions), scorer(images, prompts)
    assert ours.tolist() == pytest.approx(torchmetrics_clip_score(clip_folder, masked, prompts), abs=1e-4)
    assert (ours - whole).abs().min() > 0.1 and ours.min() > 0


def test_a_missing_clip_model_is_one_line_naming_it(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(InputError) as e:
        ev.CLIPScorer.load(str(tmp_path / "no-clip-here"))
    assert "no-clip-here" in str(e.value) and "Hugging Face cache" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ structure distance

from efddpm.eval.dino import DINO_VITB8, DinoConfig, DinoViT  # noqa: E402

TINY_DINO = DinoConfig(patch_size=8, dim=32, depth=3, heads=2, mlp_ratio=4, grid=28)   # ViT-B/8's input grid


def test_dino_vit_has_the_official_checkpoints_names_and_shapes():
    """dino_vitbase8_pretrain.pth: ViT-B/8 (768 wide, 12 blocks of 12 heads, MLP 3072) for 224 x 224 inputs."""
    D, official = 768, {"cls_token": (1, 1, 768), "pos_embed": (1, 785, 768), "patch_embed.proj.weight": (768, 3, 8, 8),
                        "patch_embed.proj.bias": (768,), "norm.weight": (768,), "norm.bias": (768,)}
    for i in range(12):
        for name, shape in {"norm1": (D,), "attn.qkv": (3 * D, D), "attn.proj": (D, D), "norm2": (D,),
                            "mlp.fc1": (4 * D, D), "mlp.fc2": (D, 4 * D)}.items():
            official[f"blocks.{i}.{name}.weight"] = shape
            official[f"blocks.{i}.{name}.bias"] = shape[:1]
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in DinoViT(DINO_VITB8).state_dict().items()}
    assert ours == official


def random_dino(seed: int = 0) -> DinoViT:
    g = torch.Generator().manual_seed(seed)
    vit = DinoViT(TINY_DINO)
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
    return vit


def keys_by_definition(state: dict, x: torch.Tensor, c: DinoConfig) -> torch.Tensor:
    """The last block's keys, [T, heads * d], from the checkpoint's tensors by DINO's published forward
    (vision_transformer.py): patch embedding, CLS, positions, pre-norm blocks; the keys taken from qkv as
    PnPInversion's VitExtractor takes them (reshape to [T, 3, heads, d], the second of the three)."""
    f = torch.nn.functional
    t = f.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=c.patch_size)
    t = torch.cat([state["cls_token"], t.flatten(2).transpose(1, 2)], dim=1) + state["pos_embed"]   # [1, T, D]
    T, d = t.shape[1], c.dim // c.heads
    for i in range(c.depth):
        p = lambda name: (state[f"blocks.{i}.{name}.weight"], state[f"blocks.{i}.{name}.bias"])
        qkv = f.linear(f.layer_norm(t, (c.dim,), *p("norm1"), eps=1e-6), *p("attn.qkv"))[0]         # [T, 3 D]
        q, k, v = qkv.reshape(T, 3, c.heads, d).permute(1, 2, 0, 3)                                # [h, T, d]
        if i == c.depth - 1:
            return k.transpose(0, 1).reshape(T, c.heads * d)
        attention = torch.softmax(q @ k.transpose(1, 2) * d ** -0.5, dim=-1)                       # [h, T, T]
        t = t + f.linear((attention @ v).transpose(0, 1).reshape(1, T, c.dim), *p("attn.proj"))
        t = t + f.linear(f.gelu(f.linear(f.layer_norm(t, (c.dim,), *p("norm2"), eps=1e-6), *p("mlp.fc1"))),
                         *p("mlp.fc2"))


def test_last_keys_equal_dinos_published_forward_in_float64():
    vit = random_dino().double()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = keys_by_definition(vit.state_dict(), x, TINY_DINO)
    assert torch.allclose(vit.last_keys(x)[0], expected, rtol=0, atol=1e-10)


def structure_distance_by_definition(vit: DinoViT, source: torch.Tensor, edit: torch.Tensor) -> float:
    """PnPInversion: float 0..255 pixels, Resize(224) (bilinear, tensor, no antialias), Normalize(ImageNet),
    cosine self-similarity of the keys with the norms' product clamped at 1e-8, MSE of the two matrices."""
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    state = {k: v.double() for k, v in vit.state_dict().items()}

    def similarity(image):
        x = torch.nn.functional.interpolate(image.double()[None], size=(224, 224), mode="bilinear", align_corners=False)
        k = keys_by_definition(state, (x - mean) / std, vit.config)
        norms = k.norm(dim=1, keepdim=True)
        return (k @ k.T) / torch.clamp(norms @ norms.T, min=1e-8)

    return float(((similarity(edit) - similarity(source)) ** 2).mean())


def test_structure_distance_equals_the_definition_on_random_weights():
    g = torch.Generator().manual_seed(2)
    source = torch.randint(0, 256, (3, 256, 256), generator=g)      # larger than 224: resizing shrinks it
    edit = (source + torch.randint(-60, 61, (3, 256, 256), generator=g)).clamp(0, 255)
    source, edit = source.to(torch.uint8), edit.to(torch.uint8)
    distance = ev.StructureDistance(random_dino())
    expected = structure_distance_by_definition(distance.vit, source, edit)
    assert expected > 1e-4
    assert distance(source, edit) == pytest.approx(expected, rel=1e-5)
    assert distance(source, source) == 0.0


def test_structure_distance_reads_square_pictures_only():
    wide = torch.zeros(3, 32, 48, dtype=torch.uint8)
    with pytest.raises(InputError, match="square"):
        ev.StructureDistance(random_dino())(wide, wide)


def test_dino_weights_load_from_a_path_and_their_absence_is_one_line(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    state = random_dino().state_dict()
    torch.save(state, tmp_path / "dino.pth")
    save_file(state, tmp_path / "dino.safetensors")
    for name in ("dino.pth", "dino.safetensors"):
        loaded = ev.dino_weights(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    def offline(*args, **kwargs):
        import urllib.error
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(InputError) as e:
        ev.StructureDistance.load()
    message = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / "dino_vitbase8_pretrain.pth") in message
    assert "dl.fbaipublicfiles.com" in message and "no network" in message and "\n" not in message
    with pytest.raises(InputError, match="not found"):
        ev.dino_weights(tmp_path / "missing.pth")
