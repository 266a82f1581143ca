"""Blocks shared by the UNet and the VAE, under the names both original checkpoints give them."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv: `conv` in both checkpoints (UNet output blocks, VAE decoder)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]
