"""SD1.x KL autoencoder: image [B, 3, H, W] in [-1, 1] <-> latent [B, 4, H/8, W/8], in plain PyTorch.

Module names mirror the original CompVis/LDM checkpoint ("taming" Encoder/Decoder), so the official
single-file weights under `first_stage_model.` load without renaming:

    encoder   conv_in, down[i].block[j] (+ down[i].downsample), mid.block_1/attn_1/block_2, norm_out, conv_out
    quant_conv                 8 -> 8 channels: mean and log-variance of the posterior
    post_quant_conv            4 -> 4 channels
    decoder   conv_in, mid.*, up[i].block[j] (+ up[i].upsample), norm_out, conv_out
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from efddpm.nets.blocks import Upsample


@dataclass(frozen=True)
class VAEConfig:
    """Defaults are Stable Diffusion 1.x (83,653,863 parameters)."""
    image_channels: int = 3
    base_channels: int = 128                   # width of the full-resolution level
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # each level after the first halves the resolution
    num_res_blocks: int = 2                    # per level in the encoder (one more in the decoder)
    latent_channels: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215            # latents fed to the UNet are z * scaling_factor


def Normalize(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = Normalize(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-conv projections."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = Normalize(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))  # [B, 1, HW, C]
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # [B, HW, C]
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 conv with the original's asymmetric padding (right and bottom only)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # [B, C, H/2, W/2]


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder level: residual blocks, then a Downsample (None at the deepest level: no weights)."""

    def __init__(self, blocks: list[nn.Module], downsample: Downsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder level: residual blocks, then an Upsample (None at the full-resolution level: no weights)."""

    def __init__(self, blocks: list[nn.Module], upsample: Upsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Image [B, 3, H, W] -> [B, 2 * latent_channels, H/f, W/f], f = 2^(levels-1)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.base_channels * m for m in c.channel_mult]
        self.conv_in = nn.Conv2d(c.image_channels, c.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch = c.base_channels
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(ch, width, c.norm_groups))
                ch = width
            last = level == len(widths) - 1
            self.down.append(DownLevel(blocks, None if last else Downsample(ch)))
        self.mid = MidBlock(ch, c.norm_groups)
        self.norm_out = Normalize(ch, c.norm_groups)
        self.conv_out = nn.Conv2d(ch, 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, latent_channels, h, w] -> image [B, 3, h*f, w*f]. `up[i]` is level i: built and run deepest first."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.base_channels * m for m in c.channel_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(c.latent_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, c.norm_groups)
        levels = []
        for level in reversed(range(len(widths))):
            blocks = []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, widths[level], c.norm_groups))
                ch = widths[level]
            levels.append(UpLevel(blocks, None if level == 0 else Upsample(ch)))
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = Normalize(ch, c.norm_groups)
        self.conv_out = nn.Conv2d(ch, c.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, exp(logvar)), each [B, latent_channels, h, w]."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise


class AutoencoderKL(nn.Module):
    """encode(image) -> DiagonalGaussian over z; decode(z) -> image. The UNet sees z * scaling_factor."""

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, image: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(image)))  # moments [B, 2*latent, h, w]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))  # [B, 3, H, W]

    def forward(self, image: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction through a posterior sample (what training needs), and the posterior."""
        posterior = self.encode(image)
        return self.decode(posterior.sample(generator)), posterior
