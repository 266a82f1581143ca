"""Statistics of the noise maps (paper Fig. 4).

Edit-friendly noise maps have a per-pixel variance well above 1 and consecutive maps are
negatively correlated; native maps (forward-chain trajectories, a good model) have variance ~1 and
no correlation. Both statistics treat the entries of z_t (its pixels, and its batch rows) as
samples: `variance(zs)[n-1]` is the variance of the entries of z_n, `correlation(zs)[n-2]` the
Pearson correlation of the entries of z_n with those of z_{n-1} (n is the paper's t).
"""
from __future__ import annotations

import torch
from torch import Tensor

from efddpm.method.latent_code import LatentCode


def variance(zs: Tensor) -> Tensor:
    """Per-pixel variance of each z_n: zs [N, B, ...] -> [N] (float64), index n-1 <-> z_n."""
    flat = zs.detach().reshape(zs.shape[0], -1).double()                  # [N, M]
    return flat.var(dim=1, unbiased=False)


def correlation(zs: Tensor) -> Tensor:
    """Pearson correlation of z_n with z_{n-1}: zs [N, ...] -> [N-1] (float64), index n-2 <-> (z_n, z_{n-1})."""
    flat = zs.detach().reshape(zs.shape[0], -1).double()                  # [N, M]
    flat = flat - flat.mean(dim=1, keepdim=True)
    a, b = flat[1:], flat[:-1]                                              # z_n, z_{n-1}
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def noise_statistics(code: LatentCode, drop_last: bool | None = None) -> dict:
    """Variance and consecutive correlation of a code's noise maps, with their timesteps.

    drop_last leaves out z_1 (the code's zs[0]); by default only when the code zeroed it.
    Returns {"t": [M] timesteps of z_n, "variance": [M], "correlation": [M-1],
             "mean_variance": float, "mean_correlation": float}.
    """
    if drop_last is None:
        drop_last = bool(code.settings.get("zero_last_noise", False))
    zs = code.zs[1:] if drop_last else code.zs                             # [M, B, ...]
    first = 2 if drop_last else 1
    n = torch.arange(first, code.num_steps + 1)                            # paper's t of zs
    var, corr = variance(zs), correlation(zs)
    return {"t": code.timesteps.flip(0)[n - 1], "variance": var, "correlation": corr,
            "mean_variance": float(var.mean()), "mean_correlation": float(corr.mean())}
