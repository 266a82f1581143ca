"""CLIP ViT-L/14 text encoder as SD1.x uses it: token ids [B, 77] -> last hidden state [B, 77, 768].

Module names mirror the checkpoints (`cond_stage_model.transformer.text_model.` in the single file,
`text_model.` in the diffusers/transformers folder), so both load without renaming:

    embeddings.token_embedding, embeddings.position_embedding
    encoder.layers[i]: layer_norm1, self_attn (q/k/v/out_proj), layer_norm2, mlp (fc1, fc2)
    final_layer_norm  applied to all 77 positions; SD1.x conditions the UNet on its output
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class CLIPTextConfig:
    """Defaults are the CLIP ViT-L/14 text tower of SD1.x (123,060,480 parameters)."""
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072


def embedding(rows: int, width: int) -> nn.Embedding:
    """nn.Embedding(rows, width) initialised as PyTorch does (N(0, 1)), except on the meta device, where a model is
    built to be filled from a checkpoint: there the initialisation is skipped, because normal_ on a meta tensor
    imports torch._dynamo (1-2 s of every command's start, for values that are thrown away)."""
    weight = torch.empty(rows, width)                                       # [rows, width]
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(rows, width, _weight=weight)


class Embeddings(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.token_embedding = embedding(c.vocab_size, c.width)
        self.position_embedding = embedding(c.context_length, c.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Positions are made here, never loaded: checkpoints' `position_ids` are often float-corrupted.
        positions = torch.arange(ids.shape[1], device=ids.device)  # [L]
        return self.token_embedding(ids) + self.position_embedding(positions)  # [B, L, width]


class SelfAttention(nn.Module):
    """Causal multi-head self-attention: position i sees positions <= i."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.heads = c.heads
        self.q_proj = nn.Linear(c.width, c.width)
        self.k_proj = nn.Linear(c.width, c.width)
        self.v_proj = nn.Linear(c.width, c.width)
        self.out_proj = nn.Linear(c.width, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = (proj(x).view(B, L, self.heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, L, C/heads]
        return self.out_proj(out.transpose(1, 2).reshape(B, L, C))


class MLP(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.width, c.mlp_width)
        self.fc2 = nn.Linear(c.mlp_width, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick-GELU


class EncoderLayer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.width)
        self.self_attn = SelfAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.width)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(c) for _ in range(c.layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextModel(nn.Module):
    """Token ids [B, L <= context_length] -> final-layer-normed hidden states [B, L, width]."""

    def __init__(self, config: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))
