"""DDPM sampling with fresh noise (eq. 3, a new z_t at every step): the sampler of the training recipe's samples
and the second half of SDEdit. (Regeneration from a latent code replays the code's z_t instead:
efddpm.method.inversion.regenerate.)"""
from __future__ import annotations

import torch
from torch import Tensor

from efddpm.method.defaults import ETA
from efddpm.method.network import NoisePredictor, draw_noise, guided_eps, working_dtype
from efddpm.method.scheduler import SD1, ScheduleConfig, alphas_cumprod, ddpm_step, step_coefficients, timesteps


def sample(f: NoisePredictor, x: Tensor, cond=None, uncond=None, guidance=None, *, start: int, num_steps: int,
           eta: float = ETA, generator: torch.Generator | None = None, schedule: ScheduleConfig = SD1,
           noise: Tensor | None = None) -> Tensor:
    """From x = x_t at the paper's t = start (start = num_steps: x is x_T) down to x_0, drawing every z_t from
    `generator` (or torch's global one), or taking them from `noise` [start, B, ...] (noise[i] for t = start - i,
    the order they are drawn in). x: [B, ...]; returns x_0 [B, ...] in the working dtype (>= float32)."""
    abar, ts = alphas_cumprod(schedule), timesteps(num_steps, schedule).tolist()
    dtype = working_dtype(x)
    x = x.to(dtype)
    if noise is not None and tuple(noise.shape) != (start, *x.shape):
        raise ValueError(f"noise must have shape {(start, *x.shape)}, got {tuple(noise.shape)}")
    for i, n in enumerate(range(start, 0, -1)):                              # the paper's t = n
        s = step_coefficients(abar, ts[num_steps - n], num_steps, schedule, eta)
        eps = guided_eps(f, x, s.t, cond, uncond, guidance)                  # f_t(x_t), [B, ...]
        z = draw_noise(x.shape, generator, dtype, x.device) if noise is None else noise[i].to(x.device, dtype)
        x = ddpm_step(x, eps, s, z)                                          # eq. 3, a fresh z_t
    return x
