"""PIE-Bench's background preservation: PSNR, MSE and SSIM between the source and the edit on the unedited region.

As PnPInversion's evaluation (evaluation/matrics_calculator.py, with torchmetrics) computes them, for one pair:

    x = source / 255 * R,  y = edit / 255 * R        R: the unedited region (1 - the edited mask), [H, W] of 0/1

    MSE  = sum (x - y)^2 / (3 H W)                   over every pixel of the picture, the masked-out ones too (0)
    PSNR = 10 log10(1 / MSE)                         peak 1 (data_range=1.0)
    SSIM = mean over the valid pixels of  (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))

where mu, s^2 and s_xy are the local means, variances and covariance under an 11 x 11 Gaussian window of
sigma 1.5, per channel, C1 = (0.01)^2, C2 = (0.03)^2, and "valid" means the pixels whose window lies inside the
picture (all but a 5-pixel border). The masked-out pixels are 0 in both images and count in every mean, as in
the reference: the numbers compare only with numbers computed the same way.

SSIM's border: the torchmetrics releases PIE-Bench was measured with (2023) averaged the SSIM map over the valid
pixels; since torchmetrics' PR 2721 (September 2024) it averages the whole reflection-padded map. Here the map
comes from torchmetrics and the valid pixels are averaged, so the number is that of the published tables
whatever torchmetrics is installed. If no pixel is unedited, every score is NaN (the reference writes "nan").
"""
from __future__ import annotations

import math

import torch

from efddpm.eval.optional import require
from efddpm.eval.pixels import checked_region, unit_pair

SSIM_WINDOW = 11      # torchmetrics' Gaussian window for sigma 1.5: int(3.5 * 1.5 + 0.5) * 2 + 1
SSIM_BORDER = (SSIM_WINDOW - 1) // 2


def masked(image: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """image [3, H, W] * region [H, W]: the region's pixels kept, the others 0."""
    return image * region                               # [3, H, W]


def mse(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error over all 3 H W values of two [3, H, W] images in [0, 1]."""
    functional = require("torchmetrics.functional.regression", "MSE")
    return float(functional.mean_squared_error(x, y))


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """10 log10(1 / MSE), in dB, for two [3, H, W] images in [0, 1]; infinite for identical images."""
    functional = require("torchmetrics.functional.image", "PSNR")
    return float(functional.peak_signal_noise_ratio(x[None], y[None], data_range=1.0))


def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """SSIM of two [3, H, W] images in [0, 1] (H, W > 10): torchmetrics' SSIM map, averaged over the pixels
    whose 11 x 11 window lies inside the picture."""
    functional = require("torchmetrics.functional.image", "SSIM")
    _, full = functional.structural_similarity_index_measure(x[None], y[None], data_range=1.0,
                                                             return_full_image=True)   # full: [1, 3, H, W]
    b = SSIM_BORDER
    return float(full[..., b:-b, b:-b].mean())


def background_scores(source, edit, region) -> dict[str, float]:
    """{"psnr", "mse", "ssim"} of the edit against the source on `region` (the unedited region, [H, W] of 0/1,
    e.g. efddpm.eval.unedited_region(rle)); images as efddpm.eval.rgb_pixels reads them, of one size."""
    x, y = unit_pair(source, edit)                      # [3, H, W] each, in [0, 1]
    region = checked_region(region, x)
    if not bool(region.any()):
        return {"psnr": math.nan, "mse": math.nan, "ssim": math.nan}
    x, y = masked(x, region), masked(y, region)
    return {"psnr": psnr(x, y), "mse": mse(x, y), "ssim": ssim(x, y)}
