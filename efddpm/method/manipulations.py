"""The paper's manipulations of the edit-friendly noise space: image shifting, colour
manipulation, and SDEdit as the baseline for the latter.

Shapes: latents [B, C, h, w]; codes as in efddpm.method.inversion (xts [N+1, B, C, h, w], zs [N, B, C, h, w]).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from efddpm.method.defaults import ETA, STEPS
from efddpm.method.inversion import regenerate
from efddpm.method.latent_code import LatentCode
from efddpm.method.network import NoisePredictor, draw_noise, working_dtype
from efddpm.method.sampling import sample
from efddpm.method.scheduler import SD1, ScheduleConfig, alphas_cumprod, marginal, timesteps


# ---------------------------------------------------------------------------------------------
# Image shifting
# ---------------------------------------------------------------------------------------------

def shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """Shift the last two (spatial) axes by (dy, dx) pixels, circularly (torch.roll).

    The border is filled with what leaves the other side. For noise maps this keeps every map
    an exact permutation of itself, so its statistics (variance, correlations) are untouched;
    replicate or zero padding would put duplicated or zero "noise" in the border band. The
    d-wide band that wrapped around is not meaningful content: leave it out when comparing.
    """
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def shift_code(code: LatentCode, dy: int, dx: int) -> LatentCode:
    """Shift x_T, every noise map z_t and the stored trajectory (so that any skip works)."""
    xts, zs = shift(code.xts, dy, dx), shift(code.zs, dy, dx)
    return replace(code, x_T=xts[code.num_steps], zs=zs, xts=xts,
                   settings={**code.settings, "shift": [dy, dx]})


def interior(x: Tensor, dy: int, dx: int, margin: int = 0) -> Tensor:
    """x without the band that shift(., dy, dx) wrapped around (plus `margin` pixels each side)."""
    h, w = x.shape[-2:]
    y0, y1 = max(dy, 0) + margin, h + min(dy, 0) - margin
    x0, x1 = max(dx, 0) + margin, w + min(dx, 0) - margin
    return x[..., y0:y1, x0:x1]


def shift_error(output: Tensor, x0: Tensor, dy: int, dx: int, margin: int = 0) -> float:
    """Relative error of a regenerated shifted code against the shifted input, on the interior:
    ||out - shift(x0)|| / ||shift(x0)||, both restricted to interior(., dy, dx, margin)."""
    ref = interior(shift(x0, dy, dx), dy, dx, margin)
    out = interior(output, dy, dx, margin)
    return float((out - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------------------------
# Colour manipulation, and SDEdit
# ---------------------------------------------------------------------------------------------

def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A binary image mask [B or 1, 1, H, W] (or [H, W]) -> the latent grid [.., 1, h, w]: a
    latent pixel is in the mask when any image pixel under it is (max-pooling)."""
    m = mask.float()
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return (F.adaptive_max_pool2d(m, size) > 0.5).float()                       # [B, 1, h, w]


def colour_target(encode: Callable[[Tensor], Tensor], colour, image_size: tuple[int, int],
                  image: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """The coloured mask M in latent space: encode an image whose masked region is painted with
    `colour` (RGB in [0, 1]); image [1, 3, H, W] in [-1, 1], or a flat colour when None.

    encode: image [B, 3, H, W] in [-1, 1] -> scaled latent [B, 4, h, w] (e.g. the VAE mean
    times 0.18215; mode(), not sample()). Only M's values inside the latent mask are used by the edit.
    """
    c = torch.as_tensor(colour, dtype=torch.float32).reshape(1, 3, 1, 1) * 2 - 1   # [1, 3, 1, 1]
    painted = c.expand(1, 3, *image_size)
    if image is not None and mask is not None:
        m = mask.float().reshape(1, 1, *image_size)
        painted = image.float() * (1 - m) + c * m                                  # [1, 3, H, W]
    return encode(painted)


def colour_edit(f: NoisePredictor, code: LatentCode, mask: Tensor, target: Tensor,
                strength: float, step_range: tuple[int, int], cond=None, uncond=None,
                guidance=None, *, skip: int = 0, eta: float | None = None, **kwargs) -> Tensor:
    """Colour manipulation (the paper's colour edits): regenerate, and for t in [T1, T2] replace
    z_t by z_t + s * B * (M - P(f_t(x_t))).

    mask B: [B or 1, 1 or C, h, w] binary, latent grid; target M: latent [.., C, h, w];
    step_range (T1, T2): the paper's t (1 = last step, N = first), inclusive.
    """
    t1, t2 = sorted(step_range)

    def push(n: int, z: Tensor, x0_pred: Tensor) -> Tensor:
        if t1 <= n <= t2:
            return z + strength * mask * (target - x0_pred)
        return z
    return regenerate(f, code, cond, uncond, guidance, skip=skip, eta=eta, noise_edit=push, **kwargs)


def paste(x0: Tensor, mask: Tensor, target: Tensor) -> Tensor:
    """x0 with the masked region replaced by the target colour latent (the input SDEdit edits)."""
    return x0 * (1 - mask) + target * mask


def sdedit_noise(shape, start: int, generator: torch.Generator | None, dtype: torch.dtype, device) -> Tensor:
    """SDEdit's draws from `generator`, in the order sdedit draws them: the eps of the noising (eq. 2), then the
    z_t of each step t = start..1, each of `shape` [B, ...]: [start + 1, B, ...]. A batch of several pictures,
    each with its own generator, stacks their draws along dim 1 and gets each picture's own SDEdit."""
    return torch.stack([draw_noise(shape, generator, dtype, device) for _ in range(start + 1)])


def sdedit(f: NoisePredictor, x0: Tensor, start: int, cond=None, uncond=None, guidance=None, *,
           num_steps: int = STEPS, eta: float = ETA, generator: torch.Generator | None = None,
           schedule: ScheduleConfig = SD1, noise: Tensor | None = None) -> Tensor:
    """SDEdit (Meng et al.): noise x0 to the paper's t = start by eq. 2 with fresh noise, then
    sample with eq. 3 and fresh z's down to x_0. x0: [B, ...] (e.g. paste(...)); returns [B, ...].
    noise: the draws themselves ([start + 1, B, ...], sdedit_noise's layout); None: drawn from `generator`."""
    abar, ts = alphas_cumprod(schedule), timesteps(num_steps, schedule)
    dtype = working_dtype(x0)
    if noise is None:
        noise = sdedit_noise(x0.shape, start, generator, dtype, x0.device)         # [start + 1, B, ...]
    elif tuple(noise.shape) != (start + 1, *x0.shape):
        raise ValueError(f"noise must have shape {(start + 1, *x0.shape)}, got {tuple(noise.shape)}")
    noise = noise.to(x0.device, dtype)
    x = marginal(x0.to(dtype), float(abar[ts[num_steps - start]]), noise[0])      # eq. 2
    return sample(f, x, cond, uncond, guidance, start=start, num_steps=num_steps, eta=eta, schedule=schedule,
                  noise=noise[1:])
