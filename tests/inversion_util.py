"""Helpers of the inversion tests: a small random UNet as a noise predictor, stand-in prompts and latents.
(The closed-form predictor of Gaussian data is efddpm.method.toy.gaussian_noise_predictor.)"""
from functools import lru_cache

import pytest
import torch

from efddpm.nets.unet import UNet

from models_util import METHOD_UNET


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These networks are tiny: one thread is faster than several, and steady on a busy machine
    (with 2 threads a test's time varied 3-28 s). Import this fixture into a test module to use it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@lru_cache(maxsize=None)
def small_unet(dtype: torch.dtype = torch.float64, seed: int = 0) -> UNet:
    """A small UNet with PyTorch's default (random, non-zero) initialisation."""
    torch.manual_seed(seed)
    return UNet(METHOD_UNET).to(dtype).eval()


def unet_predictor(dtype: torch.dtype = torch.float64, seed: int = 0, calls: list | None = None):
    """f(x, t, cond) = unet(x, t, cond); appends each call's batch size to `calls` if given."""
    net = small_unet(dtype, seed)

    @torch.no_grad()
    def f(x, t, cond):
        if calls is not None:
            calls.append(x.shape[0])
        return net(x.to(dtype), t, cond.to(dtype))
    return f


def prompts(dtype: torch.dtype = torch.float64, n: int = 3, seed: int = 1):
    """(uncond [1, 8, 32], conds [n, 8, 32]): stand-ins for text embeddings."""
    g = torch.Generator().manual_seed(seed)
    uncond = torch.randn(1, 8, METHOD_UNET.context_dim, generator=g, dtype=dtype)
    conds = torch.randn(n, 8, METHOD_UNET.context_dim, generator=g, dtype=dtype)
    return uncond, conds


def latent(dtype: torch.dtype = torch.float64, seed: int = 2, size: int = 8) -> torch.Tensor:
    """A smooth, image-like latent [1, 4, size, size] (bilinear upsampling of a 4x4 random field)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear",
                                           align_corners=False).to(dtype)
