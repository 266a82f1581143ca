"""efddpm.eval.LPIPS against torchmetrics' LPIPS (what PnPInversion's evaluation calls) on the same random
backbones and torchmetrics' packaged heads, for 'alex', 'vgg' and 'squeeze', in float64 (agreement to 1e-12
relative) and in float32 (1e-5); PIE-Bench's masked variant against torchmetrics' LearnedPerceptualImagePatchSimilarity
called as PnPInversion calls it; the weight files and the one-line errors. Nothing is downloaded.

torchmetrics builds its backbones with torchvision's model code, so the comparisons need torchvision (and
torchmetrics, the `eval` extra) and are skipped without it; efddpm itself never imports torchvision."""
import functools
import importlib
import importlib.util
import math
import sys

import numpy as np
import pytest
import torch

import efddpm.eval as ev
from efddpm.app.datasets import decode_pie_mask
from efddpm.core.checks import InputError
from efddpm.eval.lpips import LPIPS, NETS, Backbone, Heads


from conftest import TORCHVISION                         # imported before torchmetrics (see there)
HAS_TORCHMETRICS = importlib.util.find_spec("torchmetrics") is not None
needs_torchmetrics = pytest.mark.skipif(not HAS_TORCHMETRICS, reason="torchmetrics (efddpm[eval]) is not installed")
needs_reference = pytest.mark.skipif(TORCHVISION is None or not HAS_TORCHMETRICS,
                                     reason="torchmetrics' LPIPS needs torchvision, which is not installed")
SIZES = [(64, 64), (50, 82)]   # 50 x 82: SqueezeNet's ceil-mode pooling rounds up (64 x 64 divides evenly)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any download is a failure."""
    def refuse(*args, **kwargs):
        raise AssertionError("LPIPS tried to download")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def images(n: int, size: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random images [n, 3, H, W] in [-1, 1] and noisy copies of them (LPIPS well away from 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, *size, generator=g, dtype=torch.float64) * 2 - 1
    return x, (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)


def pictures(size: tuple[int, int] = (64, 64), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random uint8 source [3, H, W] and an edit of it (the source plus noise)."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(0, 256, (3, *size), generator=g)
    edit = (source + torch.randint(-40, 41, (3, *size), generator=g)).clamp(0, 255)
    return source.to(torch.uint8), edit.to(torch.uint8)


def random_lpips(net: str, seed: int = 0) -> LPIPS:
    """efddpm's LPIPS with random backbone and heads (heads >= 0, as the learned ones), without any file."""
    torch.manual_seed(seed)
    backbone, heads = Backbone(net), Heads(net)
    with torch.no_grad():
        for p in heads.parameters():
            p.uniform_(0, 0.1)
    return LPIPS(backbone, heads)


# --------------------------------------------------------------------------------------- torchmetrics' side

def torchvision_layout(reference_backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """torchmetrics' backbone (slice1.0.weight ..., or slices.0.0.weight ... for squeeze) in the key layout of
    torchvision's checkpoint (features.0.weight ...), plus a classifier, as the ImageNet files hold one."""
    state = {}
    for key, value in reference_backbone.state_dict().items():
        parts = key.split(".")
        state[".".join(["features"] + parts[2 if parts[0] == "slices" else 1:])] = value.clone()
    state["classifier.1.weight"] = torch.zeros(10, 4)
    return state


def randomize_biases(module: torch.nn.Module, seed: int) -> None:
    """torchvision initialises VGG's and SqueezeNet's biases at 0; random ones make their loading count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def reference_lpips(net: str, seed: int = 0):
    """torchmetrics' _LPIPS with a random torchvision backbone (pnet_rand: no ImageNet weights) and its packaged
    heads."""
    from torchmetrics.functional.image.lpips import _LPIPS
    torch.manual_seed(seed)
    reference = _LPIPS(pretrained=True, net=net, pnet_rand=True)
    randomize_biases(reference.net, seed)
    return reference.eval()


def ours_from(reference, net: str, tmp_path) -> LPIPS:
    """efddpm's LPIPS loaded as a user loads it: the backbone from a torchvision-layout file, the heads from
    torchmetrics' package."""
    path = tmp_path / NETS[net][0]
    torch.save(torchvision_layout(reference.net), path)
    return LPIPS.load(net, backbone=path)


# ------------------------------------------------------------------------------------------------ parity

@needs_reference
@pytest.mark.parametrize("net", NETS)
def test_lpips_equals_torchmetrics_on_the_same_backbone(net, tmp_path):
    reference = reference_lpips(net)
    ours = ours_from(reference, net, tmp_path)
    for size in SIZES:
        x, y = images(2, size)
        expected32 = reference(x.float(), y.float()).flatten()                   # [2]
        assert torch.allclose(ours.distance(x.float(), y.float()), expected32, rtol=1e-5, atol=0), (net, size)
        double = LPIPS(ours.backbone.double(), ours.heads.double())
        expected64 = reference.double()(x, y).flatten()
        assert expected64.min() > 1e-3
        assert torch.allclose(double.distance(x, y), expected64, rtol=1e-12, atol=0), (net, size)
        reference.float(), ours.backbone.float(), ours.heads.float()


@needs_reference
@pytest.mark.parametrize("net", NETS)
def test_backbones_carry_torchvisions_feature_names_and_shapes(net):
    """The modules LPIPS runs are torchvision's features, name for name (the last pooling, never read, aside)."""
    arch = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}[net]
    with torch.device("meta"):
        theirs = {f"features.{k}": tuple(v.shape)
                  for k, v in getattr(TORCHVISION.models, arch)(weights=None).features.state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in Backbone(net).state_dict().items()}
    assert ours == theirs


@needs_reference
def test_background_lpips_equals_torchmetrics_on_the_masked_pictures(tmp_path, monkeypatch):
    """PnPInversion's calculate_lpips: HWC float32 pictures / 255 times the HWC mask of the unedited region, then
    LearnedPerceptualImagePatchSimilarity('squeeze') of 2 x - 1 (here with a random backbone)."""
    import torchmetrics.image.lpip as lpip
    monkeypatch.setattr(lpip, "_NoTrainLpips", functools.partial(lpip._NoTrainLpips, pnet_rand=True))
    torch.manual_seed(1)
    metric = lpip.LearnedPerceptualImagePatchSimilarity(net_type="squeeze")
    randomize_biases(metric.net.net, 1)
    ours = ours_from(metric.net, "squeeze", tmp_path)
    source, edit = pictures()
    rle = [10 * 64 + 12, 20, 11 * 64 + 12, 20, 30 * 64, 500]
    mask = 1 - decode_pie_mask(rle, (64, 64)).astype(np.float32)[:, :, None].repeat(3, axis=2)     # [H, W, 3]
    as_pie_bench = lambda p, m: torch.tensor(p.permute(1, 2, 0).numpy().astype(np.float32) / 255 * m).permute(2, 0, 1)
    x, y = as_pie_bench(source, mask), as_pie_bench(edit, mask)                                     # [3, H, W]
    expected = float(metric(x[None] * 2 - 1, y[None] * 2 - 1))
    region = ev.unedited_region(rle, (64, 64))
    assert ours.on_region(source, edit, region) == pytest.approx(expected, rel=1e-5)
    assert ev.background_lpips(source, edit, region, ours) == {"lpips": pytest.approx(expected, rel=1e-5)}
    whole = float(metric(as_pie_bench(source, 1)[None] * 2 - 1, as_pie_bench(edit, 1)[None] * 2 - 1))
    assert ours(source, edit) == pytest.approx(whole, rel=1e-5) and abs(whole - expected) > 1e-3


# ----------------------------------------------------------------------------------- without the reference

@pytest.mark.parametrize("net", NETS)
def test_identical_pictures_are_at_distance_zero(net):
    lpips = random_lpips(net)
    source, edit = pictures((48, 80))
    assert lpips(source, source) == 0.0 and lpips(source, edit) > 0


def test_only_the_region_counts():
    """An edit that changes only the masked-out pixels is at distance 0 on the region; a changed region pixel is
    not; an empty region gives NaN, as the reference's "nan"."""
    lpips = random_lpips("squeeze")
    source, _ = pictures()
    region = ev.unedited_region([20 * 64 + 10, 30, 21 * 64 + 10, 30], (64, 64))
    edit = torch.where(region.bool(), source, 255 - source)
    assert lpips.on_region(source, edit, region) == 0.0 < lpips(source, edit)
    edit[:, 40, 40] ^= 0x80
    assert lpips.on_region(source, edit, region) > 0
    assert math.isnan(lpips.on_region(source, edit, torch.zeros(64, 64)))


def test_weights_load_from_torch_hubs_cache_and_given_files(tmp_path, monkeypatch):
    lpips = random_lpips("alex", seed=3)
    backbone = {**lpips.backbone.state_dict(), "classifier.6.bias": torch.zeros(1000)}
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(backbone, tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    torch.save(lpips.heads.state_dict(), tmp_path / "heads.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    from safetensors.torch import save_file
    save_file(backbone, tmp_path / "alexnet.safetensors")
    source, edit = pictures()
    for given in (None, tmp_path / "alexnet.safetensors"):
        loaded = LPIPS.load("alex", backbone=given, heads=tmp_path / "heads.pth")
        assert loaded(source, edit) == lpips(source, edit)


@needs_torchmetrics
@pytest.mark.parametrize("net", NETS)
def test_heads_load_strictly_from_torchmetrics_packaged_files(net, tmp_path):
    torch.save(Backbone(net).state_dict(), tmp_path / "backbone.pth")
    heads = LPIPS.load(net, backbone=tmp_path / "backbone.pth").heads.state_dict()
    assert list(heads) == [f"lin{k}.model.1.weight" for k in range(len(NETS[net][2]))]
    assert all(bool((w >= 0).all()) and bool((w > 0).any()) for w in heads.values())


def test_missing_backbone_weights_are_one_line_naming_the_file_and_the_places(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(InputError) as e:
        LPIPS.load("squeeze")
    message = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth") in message and "\n" not in message
    assert "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth" in message
    with pytest.raises(InputError) as e:
        LPIPS.load("vgg", backbone=tmp_path / "vgg.pth")
    assert str(tmp_path / "vgg.pth") in str(e.value) and "vgg16-397923af.pth" in str(e.value)


def test_wrong_weights_nets_and_inputs_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="'alex', 'vgg', 'squeeze'.*'resnet'"):
        LPIPS.load("resnet")
    torch.save(Backbone("alex").state_dict(), tmp_path / "alex.pth")
    torch.save(Heads("alex").state_dict(), tmp_path / "heads.pth")
    with pytest.raises(InputError) as e:
        LPIPS.load("vgg", backbone=tmp_path / "alex.pth", heads=tmp_path / "heads.pth")
    assert str(tmp_path / "alex.pth") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="not found"):
        LPIPS.load("alex", backbone=tmp_path / "alex.pth", heads=tmp_path / "none.pth")
    for name, state in (("alex.pth", Backbone("alex").state_dict()), ("heads.pth", Heads("alex").state_dict())):
        del state[next(iter(state))]                                # strictly: a missing tensor is an error
        torch.save(state, tmp_path / f"partial-{name}")
        with pytest.raises(InputError, match="Missing key"):
            LPIPS.load("alex", **{"backbone": tmp_path / "alex.pth", "heads": tmp_path / "heads.pth",
                                  ("heads" if name == "heads.pth" else "backbone"): tmp_path / f"partial-{name}"})
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    with pytest.raises(InputError, match=r'pip install "efddpm\[eval\]"'):
        LPIPS.load("alex", backbone=tmp_path / "alex.pth")
    lpips, (source, edit) = random_lpips("alex"), pictures()
    with pytest.raises(InputError, match="same size"):
        lpips(source, edit[:, :-1])
    with pytest.raises(InputError, match=r"\[-1, 1\]"):
        lpips.distance(source[None].float(), edit[None].float())
