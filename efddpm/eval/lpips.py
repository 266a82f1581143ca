"""LPIPS, the Learned Perceptual Image Patch Similarity (Zhang et al., "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric", CVPR 2018), as torchmetrics' LearnedPerceptualImagePatchSimilarity computes it.

For two images x, y [3, H, W] in [-1, 1]:

    x' = (x - shift) / scale              shift = (-0.030, -0.088, -0.188), scale = (0.458, 0.448, 0.450): the
                                          [-1, 1] image in ImageNet's normalisation
    f_l, g_l = activation l of the backbone on x', y'                      [C_l, H_l, W_l]
    u = f_l / sqrt(sum_c f_l^2 + 1e-8)    unit length along the channels at each position (v likewise of g_l)
    LPIPS(x, y) = sum_l mean_{h,w} sum_c w_lc (u_c - v_c)^2                w_l >= 0: the learned head of layer l

The backbones are ImageNet classifiers and the activations their ReLU outputs: 'alex' AlexNet (5 layers), 'vgg'
VGG-16 (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), 'squeeze' SqueezeNet 1.1 (7 layers). The modules carry
torchvision's names (features.N...), so its ImageNet checkpoints load strictly (their classifier is ignored), and
the heads those of the LPIPS weight files torchmetrics ships (lin0.model.1.weight, ...); torchvision is not needed.
LPIPS to the input defaults to 'alex' (the default of torchmetrics and of the LPIPS package); PIE-Bench's background
LPIPS uses 'squeeze' on the unedited region (LPIPS.on_region, background_lpips). Pictures are 8-bit, as
efddpm.eval.rgb_pixels reads them, and measured on x / 255 * 2 - 1.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from efddpm.core.checks import InputError
from efddpm.eval.background import masked
from efddpm.eval.optional import EXTRA
from efddpm.eval.pixels import checked_region, unit_pair
from efddpm.eval.weights import read_state

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-8          # under the square root, as torchmetrics since its PR 2144 (Oct. 2023); before, f / (|f| + 1e-10)
TORCHVISION = "https://download.pytorch.org/models/"
# torchvision's checkpoint file, the indices of features whose outputs are read, their channels
NETS = {"alex": ("alexnet-owt-7be5be79.pth", (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
        "vgg": ("vgg16-397923af.pth", (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
        "squeeze": ("squeezenet1_1-b8a52dc0.pth", (1, 4, 7, 9, 10, 11, 12), (64, 128, 256, 384, 384, 512, 512))}


class Fire(nn.Module):
    """SqueezeNet's fire module: a 1x1 squeeze, then 1x1 and 3x3 expansions side by side, each after a ReLU."""

    def __init__(self, c_in: int, c_squeeze: int, c_expand: int):
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, c_squeeze, 1)
        self.expand1x1 = nn.Conv2d(c_squeeze, c_expand, 1)
        self.expand3x3 = nn.Conv2d(c_squeeze, c_expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.squeeze(x))                                                 # [N, c_squeeze, h, w]
        return torch.cat([F.relu(self.expand1x1(s)), F.relu(self.expand3x3(s))], 1)  # [N, 2 c_expand, h, w]


def layers(net: str) -> list[nn.Module]:
    """The backbone's feature layers up to the last one read, in torchvision's order (so its indices)."""
    relu = nn.ReLU
    if net == "alex":
        return [nn.Conv2d(3, 64, 11, stride=4, padding=2), relu(), nn.MaxPool2d(3, 2),
                nn.Conv2d(64, 192, 5, padding=2), relu(), nn.MaxPool2d(3, 2),
                nn.Conv2d(192, 384, 3, padding=1), relu(), nn.Conv2d(384, 256, 3, padding=1), relu(),
                nn.Conv2d(256, 256, 3, padding=1), relu()]
    if net == "vgg":
        out, c = [], 3
        for block, (width, convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]):
            out += [nn.MaxPool2d(2, 2)] if block else []
            for _ in range(convs):
                out += [nn.Conv2d(c, width, 3, padding=1), relu()]
                c = width
        return out
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)                              # noqa: E731
    return [nn.Conv2d(3, 64, 3, stride=2), relu(), pool(), Fire(64, 16, 64), Fire(128, 16, 64), pool(),
            Fire(128, 32, 128), Fire(256, 32, 128), pool(), Fire(256, 48, 192), Fire(384, 48, 192),
            Fire(384, 64, 256), Fire(512, 64, 256)]


def checked_net(net: str) -> str:
    if net not in NETS:
        raise InputError(f"LPIPS net must be one of {', '.join(map(repr, NETS))}, got {net!r}")
    return net


class Backbone(nn.Module):
    """An ImageNet classifier's feature extractor named as torchvision's (features.N...); returns the activations
    LPIPS reads."""

    def __init__(self, net: str):
        super().__init__()
        self.net = checked_net(net)
        self.features = nn.Sequential(*layers(net))
        self.taps = NETS[net][1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)                                                       # [N, C_l, H_l, W_l]
        return out


class Head(nn.Module):
    """w_l: a 1x1 convolution to one channel without bias; model.0 stands for the reference's dropout, which does
    nothing when measuring."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))


class Heads(nn.Module):
    """The heads lin0 ... lin{L-1}, named as in torchmetrics' (and the LPIPS package's) weight files."""

    def __init__(self, net: str):
        super().__init__()
        for k, channels in enumerate(NETS[checked_net(net)][2]):
            self.add_module(f"lin{k}", Head(channels))


def backbone_file(net: str, path: str | Path | None) -> Path:
    """The given path, else torch.hub's cached torchvision checkpoint; never downloaded: a one-line InputError."""
    name = NETS[net][0]
    if path is not None:
        if not Path(path).is_file():
            raise InputError(f"LPIPS {net} backbone weights not found: {path} (torchvision's {name}, from "
                             f"{TORCHVISION}{name})")
        return Path(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cached.is_file():
        raise InputError(f"LPIPS {net} backbone weights not found: {name} is not in torch.hub's cache ({cached}) "
                         f"and no path was given; download {TORCHVISION}{name} there or pass its path")
    return cached


def heads_file(net: str, path: str | Path | None) -> Path:
    """The given path, else the weight file torchmetrics ships (found without importing torchmetrics)."""
    if path is not None:
        if not Path(path).is_file():
            raise InputError(f"LPIPS {net} head weights not found: {path}")
        return Path(path)
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"LPIPS's heads come with torchmetrics, which is not installed; install the evaluation "
                         f"extra: {EXTRA}, or pass the {net}.pth heads file")
    packaged = Path(list(spec.submodule_search_locations)[0]) / "functional" / "image" / "lpips_models" / f"{net}.pth"
    if not packaged.is_file():
        raise InputError(f"LPIPS {net} head weights not found: {packaged} (torchmetrics' LPIPS weights) is absent")
    return packaged


def load_strictly(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """module's parameters from state, every key present with its shape, or a one-line InputError."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        reason = " ".join(str(e).split())                   # torch's message, on one line
        reason = reason if len(reason) <= 300 else reason[:300] + " ..."
        raise InputError(f"{path} does not hold {what}: {reason}") from None


class LPIPS:
    """LPIPS of image pairs with one backbone and its heads."""

    def __init__(self, backbone: Backbone, heads: Heads):
        self.backbone, self.heads = backbone.eval(), heads.eval()

    @classmethod
    def load(cls, net: str = "alex", backbone: str | Path | None = None, heads: str | Path | None = None,
             device: str | torch.device = "cpu") -> "LPIPS":
        """The backbone's ImageNet weights from `backbone` (.pth or .safetensors) or torch.hub's cache
        ($TORCH_HOME/hub/checkpoints/<torchvision's file>), the heads from `heads` or torchmetrics' package."""
        net = checked_net(net)
        body, head = Backbone(net), Heads(net)
        path = backbone_file(net, backbone)
        load_strictly(body, {k: v for k, v in read_state(path).items() if k.startswith("features.")}, path,
                      f"LPIPS {net}'s backbone (torchvision's {NETS[net][0]})")
        path = heads_file(net, heads)
        load_strictly(head, read_state(path), path, f"LPIPS {net}'s heads (torchmetrics' lpips_models/{net}.pth)")
        return cls(body.to(device), head.to(device))

    @torch.no_grad()
    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS of images x, y [N, 3, H, W] in [-1, 1], [N], in the networks' dtype, on the CPU."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape != y.shape or not x.numel():
            raise InputError(f"LPIPS compares images [N, 3, H, W] of one shape, got {list(x.shape)} and "
                             f"{list(y.shape)}")
        if min(float(x.min()), float(y.min())) < -1 or max(float(x.max()), float(y.max())) > 1:
            raise InputError("LPIPS reads images in [-1, 1] (8-bit pixels / 255 * 2 - 1)")
        weight = self.heads.lin0.model[1].weight
        x, y = x.to(weight), y.to(weight)                                           # [N, 3, H, W]
        shift = torch.tensor(SHIFT, dtype=torch.float32).to(x)[:, None, None]      # float32 constants, as the
        scale = torch.tensor(SCALE, dtype=torch.float32).to(x)[:, None, None]      # reference's buffers
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)             # [N]
        for k, (f, g) in enumerate(zip(self.backbone((x - shift) / scale), self.backbone((y - shift) / scale))):
            u = f / torch.sqrt(f.square().sum(1, keepdim=True) + EPS)               # [N, C_l, H_l, W_l]
            v = g / torch.sqrt(g.square().sum(1, keepdim=True) + EPS)
            head = getattr(self.heads, f"lin{k}").model
            total += head((u - v).square()).mean((2, 3))[:, 0]                       # [N]
        return total.cpu()

    def __call__(self, source, edit) -> float:
        """LPIPS of two 8-bit pictures of one size (as efddpm.eval.rgb_pixels reads them), on x / 255 * 2 - 1."""
        x, y = unit_pair(source, edit)                                              # [3, H, W] each, in [0, 1]
        return float(self.distance(x[None] * 2 - 1, y[None] * 2 - 1)[0])

    def on_region(self, source, edit, region) -> float:
        """PIE-Bench's masked LPIPS: both pictures / 255 times `region` ([H, W] of 0/1), then LPIPS of 2 x - 1 over
        the whole picture; NaN if the region is empty (the reference writes "nan")."""
        x, y = unit_pair(source, edit)                                              # [3, H, W] each, in [0, 1]
        region = checked_region(region, x)
        if not bool(region.any()):
            return math.nan
        x, y = masked(x, region), masked(y, region)
        return float(self.distance(x[None] * 2 - 1, y[None] * 2 - 1)[0])


def background_lpips(source, edit, region, metric: LPIPS | None = None) -> dict[str, float]:
    """{"lpips"}: PIE-Bench's background LPIPS on `region` (the unedited region, as for background_scores), with
    `metric`, else LPIPS.load("squeeze") (loaded at each call: pass one to measure many pairs)."""
    metric = metric if metric is not None else LPIPS.load("squeeze")
    return {"lpips": metric.on_region(source, edit, region)}
