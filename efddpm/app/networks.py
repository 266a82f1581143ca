"""The SD1.x networks as the method needs them, one home each: pictures <-> scaled latents x_0, prompts -> CLIP
states, and the UNet as a noise predictor f(x_t, t, context) for efddpm.method. Used by Editor, the training
recipe, the benchmarks and the tests alike.

Pictures are [B, 3, H, W] in [-1, 1] (efddpm.app.images converts to and from uint8). x_0 is the mode (mean) of the
VAE posterior times the scaling factor (0.18215 for SD1.x), never a sample, and is returned in at least float32:
the method divides by sigma_t (0.02 at the last step) and must never do so in half precision.
"""
from typing import Callable

import torch

from efddpm.app.fast import exact_float32
from efddpm.nets.clip import CLIPTextModel
from efddpm.nets.tokenizer import CLIPTokenizer
from efddpm.nets.vae import AutoencoderKL

Progress = Callable[[int], None]  # called with the number of network calls just made


@torch.inference_mode()
def encode_pictures(vae: AutoencoderKL, pixels: torch.Tensor, *, dtype: torch.dtype, batch: int = 64) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> x_0 [B, C, H/f, W/f] = mode * scaling_factor, in at least float32; the VAE runs
    in `dtype`, `batch` pictures at a time."""
    device = next(vae.parameters()).device
    x0 = torch.cat([vae.encode(chunk.to(device, dtype)).mode() for chunk in pixels.split(batch)])  # the mean
    return (x0 * vae.config.scaling_factor).to(torch.promote_types(dtype, torch.float32))


@torch.inference_mode()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, *, dtype: torch.dtype, batch: int = 64) -> torch.Tensor:
    """x_0 [B, C, h, w] -> pictures [B, 3, H, W] in [-1, 1] (float32)."""
    z = latents / vae.config.scaling_factor
    return torch.cat([vae.decode(chunk.to(dtype)).float().clamp(-1, 1) for chunk in z.split(batch)])


@torch.inference_mode()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """Prompts -> CLIP's last hidden states [B, 77, width] (content beyond 75 tokens is cut)."""
    device = next(text_encoder.parameters()).device
    return text_encoder(tokenizer(prompts).to(device))                                 # [B, 77, width]


def unet_predictor(unet, *, dtype: torch.dtype, progress: Progress | None = None):
    """f(x_t [B, C, h, w], t [B], context [B, 77, width]) -> eps, the UNet (or its CUDA-graphed replay) in `dtype`
    under inference_mode; the method casts eps to its own working dtype."""
    @torch.inference_mode()
    def f(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        with exact_float32(dtype):
            eps = unet(x.to(dtype), t, context.to(dtype))
        if progress is not None:
            progress(1)
        return eps
    return f
