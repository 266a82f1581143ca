"""DINO's Vision Transformer (Caron et al., ICCV 2021), as far as PIE-Bench's structure distance reads it: the keys
of the last block's self-attention. The module names are those of the official checkpoint
(dino_vitbase8_pretrain.pth, what torch.hub's facebookresearch/dino `dino_vitb8` loads), so it loads strictly,
without a renaming table.

    tokens_0 = [cls; patches(x) W_patch + b] + pos            x: [B, 3, 8 g, 8 g] -> [B, 1 + g^2, D]
    tokens_l = tokens_{l-1} + Attn(LN1(tokens_{l-1}));  tokens_l += MLP(LN2(tokens_l))     (pre-norm blocks)
    [q | k | v] = LN1(tokens_{L-1}) W_qkv + b_qkv             the last block's keys: the middle D columns

The keys of all heads side by side, k = [k_1 | ... | k_h], are the middle third of the qkv projection; "Splicing
ViT Features" (Tumanyan et al., 2022) and PIE-Bench use them so. The last block's MLP and the final norm are
never run; they are here so that the checkpoint loads strictly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class DinoConfig:
    patch_size: int = 8
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    grid: int = 28           # patches per side of the pretrained position embedding: 224 / 8


DINO_VITB8 = DinoConfig()


class PatchEmbed(nn.Module):
    def __init__(self, c: DinoConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, c.dim, kernel_size=c.patch_size, stride=c.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)                        # [B, g*g, D], rows first


class Attention(nn.Module):
    def __init__(self, c: DinoConfig):
        super().__init__()
        self.heads = c.heads
        self.qkv = nn.Linear(c.dim, 3 * c.dim)
        self.proj = nn.Linear(c.dim, c.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [B, h, T, d]
        y = F.scaled_dot_product_attention(q, k, v)                            # softmax(q k^T / sqrt(d)) v
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, c: DinoConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.dim, c.mlp_ratio * c.dim)
        self.fc2 = nn.Linear(c.mlp_ratio * c.dim, c.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))                                   # exact (erf) GELU


class Block(nn.Module):
    def __init__(self, c: DinoConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.dim, eps=1e-6)
        self.attn = Attention(c)
        self.norm2 = nn.LayerNorm(c.dim, eps=1e-6)
        self.mlp = Mlp(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DinoViT(nn.Module):
    def __init__(self, c: DinoConfig = DINO_VITB8):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.grid * c.grid, c.dim))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim, eps=1e-6)

    def last_keys(self, x: torch.Tensor) -> torch.Tensor:
        """The keys of the last block, all heads side by side, [B, 1 + g^2, D] (the CLS token first), for images
        x [B, 3, 8 g, 8 g] already normalized; g is the pretrained grid (no position interpolation)."""
        B, D = x.shape[0], self.config.dim
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.patch_embed(x)], dim=1)  # [B, T, D]
        x = x + self.pos_embed
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        return last.attn.qkv(last.norm1(x))[..., D:2 * D]                      # [B, T, D]: q | k | v, the k
