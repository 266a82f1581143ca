"""The network as the method calls it: any noise predictor, classifier-free guidance, and the method's dtype.

    f(x: Tensor[B, ...], t: Tensor[B] int64 timesteps, cond) -> eps: Tensor[B, ...]

(the SD1.x UNet with text embeddings as `cond`, a small test UNet, or the closed-form predictor of the 2-D toy), so
nothing in efddpm.method depends on the tensor shape: [B, 2] vectors or [B, 4, h, w] latents.

Classifier-free guidance. eps = f_u + w (f_c - f_u) is computed from ONE batched call of f over [uncond; cond].
When `cond` is None (no prompt, e.g. the authors' empty source prompt) or `uncond` or `guidance` is None, there is no
guidance term: a single call f(x, t, cond or uncond), as the authors' code does for an empty source prompt. (SD's ""
embedding is the uncond embedding, so guidance with it would give the same eps up to rounding, at twice the cost.)

Precision. The method keeps x_t and the noise maps in a working dtype of at least float32 (float64 stays float64) and
casts the network's output to it, so eq. 5 divides by sigma_t (0.02 at the last step) in float32 even when f runs
in fp16.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

NoisePredictor = Callable[[Tensor, Tensor, Any], Tensor]


def working_dtype(x: Tensor) -> torch.dtype:
    """At least float32: eq. 5 divides by sigma_t ~ 0.02."""
    return torch.promote_types(x.dtype, torch.float32)


def draw_noise(shape, generator: torch.Generator | None, dtype: torch.dtype, device) -> Tensor:
    """Standard normal noise from `generator` (drawn on its device) or from torch's global generator."""
    if generator is None:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device).to(device)


def rows(c: Tensor | None, k: int) -> Tensor | None:
    """A conditioning (or any per-sample tensor) with batch 1 or k, as batch k."""
    if c is None or c.shape[0] == k:
        return c
    if c.shape[0] == 1:
        return c.expand(k, *c.shape[1:])
    raise ValueError(f"batch {c.shape[0]} does not broadcast to {k}")


def guided_eps(f: NoisePredictor, x: Tensor, t: int | Tensor, cond: Tensor | None = None,
               uncond: Tensor | None = None, guidance: float | Sequence[float] | Tensor | None = None) -> Tensor:
    """f_t(x) with classifier-free guidance f_u + w (f_c - f_u), one batched call over [uncond; cond].

    x: [K, ...]; t: one timestep, or one per row ([K]); cond, uncond: [K or 1, ...]; guidance: a number or one per
    row ([K]). Returns eps [K, ...] in x's dtype.
    """
    k = x.shape[0]
    if cond is None or uncond is None or guidance is None:                    # no guidance term
        return f(x, timestep_rows(t, k, x.device), rows(cond if cond is not None else uncond, k)).to(x.dtype)
    both = f(torch.cat([x, x]), timestep_rows(t, 2 * k, x.device),           # [2K, ...]
             torch.cat([rows(uncond, k), rows(cond, k)]))
    f_u, f_c = both.to(x.dtype).chunk(2)                                      # [K, ...] each
    if not isinstance(guidance, (int, float)):                                # one weight per row
        guidance = torch.as_tensor(guidance, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
    return f_u + guidance * (f_c - f_u)


def timestep_rows(t: int | Tensor, k: int, device: torch.device) -> Tensor:
    """t (one timestep, or one per row [K]) as int64 [k] on `device`: a number becomes a filled tensor, never a copy
    from the host, so a step does not wait for the GPU (a copy from pageable memory synchronizes), and the
    inversion on one CUDA stream can run ahead of the regeneration on another."""
    if isinstance(t, Tensor) and t.dim() > 0:
        t = t.to(device=device, dtype=torch.long)
        return t if t.shape[0] == k else t.repeat(k // t.shape[0])           # [K] -> [2K]: [t; t]
    return torch.full((k,), int(t), dtype=torch.long, device=device)
