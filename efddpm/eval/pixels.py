"""Images and PIE-Bench regions as the metrics read them.

Every metric reads 8-bit RGB pictures, as PIE-Bench's evaluation reads its JPEG and PNG files: an image is a
uint8 tensor [3, H, W]. A region is a float tensor [H, W] of 0 and 1; a masked image is image * region, pixel by
pixel (PnPInversion multiplies the [0, 1] image, or for CLIP the 0..255 image, by the region before measuring).
"""
from __future__ import annotations

import numpy as np
import torch

from efddpm.app.datasets import decode_pie_mask
from efddpm.app.images import as_pil, to_rgb
from efddpm.core.checks import InputError


def rgb_pixels(image) -> torch.Tensor:
    """A path, PIL image, uint8 array [H, W(, C)] or tensor [3, H, W] -> uint8 tensor [3, H, W] (RGB; alpha
    over white, as efddpm reads every picture)."""
    array = np.array(to_rgb(as_pil(image)))               # [H, W, 3] uint8, a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [3, H, W]


def unit(image) -> torch.Tensor:
    """The image as float32 [3, H, W] in [0, 1]: pixels / 255."""
    return rgb_pixels(image).float() / 255


def unit_pair(source, edit) -> tuple[torch.Tensor, torch.Tensor]:
    """unit(source), unit(edit): two float32 [3, H, W] in [0, 1] of one size, or InputError."""
    x, y = unit(source), unit(edit)
    if x.shape != y.shape:
        raise InputError(f"source and edit must have the same size, got {list(x.shape[1:])} and {list(y.shape[1:])}")
    return x, y


def edited_region(rle, shape: tuple[int, int] = (512, 512)) -> torch.Tensor:
    """PIE-Bench's edited region from the mapping file's run-length encoding, as float [H, W] of 0 and 1: the
    mask decoded by efddpm.app.datasets.decode_pie_mask, whose outermost rows and columns are always 1."""
    return torch.from_numpy(decode_pie_mask(rle, shape).astype(np.float32))  # [H, W]


def unedited_region(rle, shape: tuple[int, int] = (512, 512)) -> torch.Tensor:
    """PIE-Bench's background: 1 - edited_region, float [H, W]."""
    return 1 - edited_region(rle, shape)


def checked_region(region, image: torch.Tensor, name: str = "region") -> torch.Tensor:
    """region as float32 [H, W] matching the image [3, H, W], every value 0 or 1."""
    region = torch.as_tensor(region)                       # a tensor, numpy array or nested lists
    if region.shape != image.shape[1:]:
        raise InputError(f"{name} must be [H, W] = {list(image.shape[1:])} like the image, got {list(region.shape)}")
    region = region.float()
    if not bool(((region == 0) | (region == 1)).all()):
        raise InputError(f"{name} must hold only 0 and 1 (a mask), got values in "
                         f"[{float(region.min()):g}, {float(region.max()):g}]")
    return region
