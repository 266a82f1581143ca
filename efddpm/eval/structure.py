"""PIE-Bench's structure distance: how far the edit's structure drifted from the source's, read by DINO ViT-B/8.

As PnPInversion's evaluation computes it (its LossG.calculate_global_ssim_loss, after "Splicing ViT Features",
Tumanyan et al. 2022), for a square picture:

    x     = Normalize_ImageNet(Resize_224(pixels))      pixels as float 0..255: the reference does not divide by
                                                        255 before the ImageNet mean and std; bilinear, no
                                                        antialiasing (torchvision 0.13's resize of a tensor)
    k     = the keys of DINO ViT-B/8's last block, all heads side by side, [T, D]   (T = 1 + 28 * 28, D = 768)
    S_ij  = k_i . k_j / max(|k_i| |k_j|, 1e-8)          the keys' self-similarity (cosine), [T, T]
    distance = mean over i, j of (S_ij(edit) - S_ij(source))^2

PIE-Bench reports it x10^3, over the whole picture. The weights are the official DINO checkpoint, read from a
path given, else torch.hub's cache ($TORCH_HOME/hub/checkpoints, where torch.hub.load('facebookresearch/dino:main',
'dino_vitb8') keeps it), else downloaded from DINO's address into that cache.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from efddpm.core.checks import InputError
from efddpm.eval.dino import DINO_VITB8, DinoViT
from efddpm.eval.pixels import rgb_pixels
from efddpm.eval.weights import read_state

DINO_VITB8_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_input(image, side: int) -> torch.Tensor:
    """A square picture as the reference feeds DINO: 0..255 floats, resized to side x side (bilinear, no
    antialiasing), minus the ImageNet mean, over its std; [1, 3, side, side]."""
    pixels = rgb_pixels(image).float()[None]                                   # [1, 3, H, W], 0..255
    if pixels.shape[2] != pixels.shape[3]:
        raise InputError(f"the structure distance reads square pictures (PIE-Bench's are 512 x 512), got "
                         f"{pixels.shape[3]}x{pixels.shape[2]}")
    x = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False, antialias=False)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def self_similarity(keys: torch.Tensor) -> torch.Tensor:
    """S_ij = k_i . k_j / max(|k_i| |k_j|, 1e-8) of keys [T, D]; [T, T]."""
    norms = keys.norm(dim=-1, keepdim=True)                                    # [T, 1]
    return (keys @ keys.T) / (norms @ norms.T).clamp(min=1e-8)


def dino_weights(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """DINO ViT-B/8's state dict: the file at path (.pth or .safetensors), else torch.hub's cached
    dino_vitbase8_pretrain.pth, else that file downloaded into the cache; a one-line InputError if none."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"DINO weights not found: {path}")
        return read_state(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / DINO_VITB8_URL.rsplit("/", 1)[1]
    try:
        return torch.hub.load_state_dict_from_url(DINO_VITB8_URL, map_location="cpu", weights_only=True)
    except Exception as e:                   # urllib's URLError, HTTPError, socket errors, a damaged download
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"DINO ViT-B/8 weights not found: {cached} is absent and {DINO_VITB8_URL} could not be "
                         f"downloaded ({reason}); download it there or pass its path") from None


class StructureDistance:
    """mean (S(edit) - S(source))^2 of the DINO keys' self-similarity, for pairs of square pictures."""

    def __init__(self, vit: DinoViT):
        self.vit = vit.eval()

    @classmethod
    def load(cls, weights: str | Path | None = None, device: str | torch.device = "cpu") -> "StructureDistance":
        """DINO ViT-B/8 with the official weights (see dino_weights)."""
        vit = DinoViT(DINO_VITB8)
        vit.load_state_dict(dino_weights(weights))
        return cls(vit.to(device))

    @torch.no_grad()
    def keys_self_similarity(self, image) -> torch.Tensor:
        """S of one picture, [T, T]."""
        c, device = self.vit.config, self.vit.pos_embed.device
        keys = self.vit.last_keys(dino_input(image, c.patch_size * c.grid).to(device))[0]   # [T, D]
        return self_similarity(keys.float())

    def __call__(self, source, edit) -> float:
        return float(F.mse_loss(self.keys_self_similarity(edit), self.keys_self_similarity(source)))
