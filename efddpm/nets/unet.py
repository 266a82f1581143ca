"""SD1.x denoising UNet f(x_t, t, text), in plain PyTorch.

Module names mirror the original CompVis/LDM checkpoint ("openaimodel"), so the official single-file
weights under `model.diffusion_model.` load without renaming:

    time_embed            timestep (sinusoid) -> 1280-d embedding
    input_blocks[0]       conv 4 -> 320
    input_blocks[1..11]   per level: num_res_blocks x (ResBlock [+ SpatialTransformer]), then Downsample
    middle_block          ResBlock, SpatialTransformer, ResBlock
    output_blocks[0..11]  per level (deepest first): num_res_blocks+1 x (ResBlock on the concatenated
                          skip [+ SpatialTransformer]) [+ Upsample]
    out                   GroupNorm, SiLU, conv 320 -> 4

Attention control (efddpm.nets.attention_control): within `with unet.controlled(control):` every attention layer
asks the controller whether to hand over its probabilities, to be read or replaced (Prompt-to-Prompt); without a
controller the fused scaled_dot_product_attention runs alone. The weights and outputs are the same either way.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from efddpm.nets.attention_control import AttentionControl, AttentionSite, attention_probabilities
from efddpm.nets.blocks import Upsample


@dataclass(frozen=True)
class UNetConfig:
    """Defaults are Stable Diffusion 1.x (859,520,964 parameters)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320                  # width of level 0; the timestep embedding is 4x this
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width of each level, in units of model_channels
    num_res_blocks: int = 2                    # residual blocks per level on the way down (one more up)
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with a cross-attention transformer
    num_heads: int = 8
    context_dim: int = 768                     # width of the text encoder's hidden states
    norm_groups: int = 32
    dropout: float = 0.0                       # inside residual blocks; 0 for SD1.x


def timestep_embedding(t: torch.Tensor, dim: int, dtype: torch.dtype, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps t [B] -> [B, dim].

    Computed in float32, or float64 when the model runs in float64 (audits)."""
    dtype = torch.promote_types(dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.to(dtype)[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # [B, out, H, W]
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


def ask(control: AttentionControl, site: AttentionSite, queries: int, keys: int) -> bool:
    """control.wants(...), never traced by torch.compile once a controller was set (keep_out_of_graphs): a
    controller's state (its step counter) would otherwise become a guard of the compiled UNet and recompile it at
    every step."""
    return bool(control.wants(site, queries, keys))


def hand_over(control: AttentionControl, site: AttentionSite, probs: torch.Tensor) -> torch.Tensor:
    """control(site, probs): the probabilities read or replaced, outside torch.compile's graphs (as ask)."""
    return control(site, probs)


def keep_out_of_graphs() -> None:
    """Rebind ask and hand_over to their torch.compiler.disable'd selves, once, when a controller is first set
    (UNet.controlled): the attention layers look them up at each call. Not at import: torch.compiler.disable imports
    torch._dynamo, about a second of every command's start, which only a controlled UNet needs."""
    global ask, hand_over
    if not getattr(ask, "out_of_graphs", False):
        ask, hand_over = torch.compiler.disable(ask), torch.compiler.disable(hand_over)
        ask.out_of_graphs = True


class CrossAttention(nn.Module):
    """Multi-head attention of x [B, N, dim] over context [B, M, context_dim] (self-attention if None).

    site: where it sits (set by the UNet); control: the UNet's controller while one is set (UNet.controlled)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))
        self.site: AttentionSite | None = None
        self.control: AttentionControl | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, N, C = x.shape
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)  # [B, heads, N, C/heads]
        k = self.to_k(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)  # [B, heads, M, C/heads]
        v = self.to_v(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        if self.control is None or not ask(self.control, self.site, N, context.shape[1]):
            out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, C/heads], probabilities never formed
        else:
            probs = hand_over(self.control, self.site, attention_probabilities(q, k))  # [B, heads, N, M]
            out = probs.to(v.dtype) @ v  # [B, heads, N, C/heads]
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    """Linear to twice the width, then value * GELU(gate)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; each pre-normed and residual."""

    def __init__(self, dim: int, context_dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map [B, C, H, W] -> tokens [B, HW, C] -> transformer block -> back, with a residual."""

    def __init__(self, ch: int, context_dim: int, heads: int, groups: int, dropout: float):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, context_dim, heads, dropout)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # [B, HW, C]
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # [B, C, H/2, W/2]


class TimestepEmbedSequential(nn.ModuleList):
    """One UNet block: layers applied in order, each given what it needs (embedding or text)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """Noise prediction eps = f(x_t [B, 4, h, w], t [B], context [B, 77, 768]) -> [B, 4, h, w]."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = c = config
        self.gradient_checkpointing = False  # trade compute for memory in training
        emb_dim = 4 * c.model_channels
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(in_ch, out_ch):
            return ResBlock(in_ch, out_ch, emb_dim, c.norm_groups, c.dropout)

        placed = []  # (place, level, transformer) in call order: the attention sites

        def attn(ch, place, level):
            transformer = SpatialTransformer(ch, c.context_dim, c.num_heads, c.norm_groups, c.dropout)
            placed.append((place, level, transformer))
            return transformer

        ch = c.model_channels
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([nn.Conv2d(c.in_channels, ch, 3, padding=1)])])
        skip_channels = [ch]  # width of every input block's output, consumed in reverse by output_blocks
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [res(ch, mult * c.model_channels)]
                ch = mult * c.model_channels
                if level in c.attention_levels:
                    layers.append(attn(ch, "down", level))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential([res(ch, ch), attn(ch, "mid", len(c.channel_mult) - 1),
                                                     res(ch, ch)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * c.model_channels)]
                ch = mult * c.model_channels
                if level in c.attention_levels:
                    layers.append(attn(ch, "up", level))
                if level != 0 and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(layers))

        self.out = nn.Sequential(nn.GroupNorm(c.norm_groups, ch), nn.SiLU(), nn.Conv2d(ch, c.out_channels, 3, padding=1))

        self.attention_layers = []  # every CrossAttention, in call order (a plain list: no new weights)
        counts = {False: 0, True: 0}  # layers so far of each kind: self, cross
        for place, level, transformer in placed:
            for block in transformer.transformer_blocks:
                for layer, cross in ((block.attn1, False), (block.attn2, True)):  # BasicTransformerBlock's order
                    layer.site = AttentionSite(place, level, cross, counts[cross])
                    counts[cross] += 1
                    self.attention_layers.append(layer)
        self.attention_control: AttentionControl | None = None   # the controller set now (UNet.controlled)

    @property
    def attention_sites(self) -> list[AttentionSite]:
        """Every attention layer's site, in call order."""
        return [layer.site for layer in self.attention_layers]

    @contextmanager
    def controlled(self, control: AttentionControl):
        """Within the block, every attention layer consults `control` (efddpm.nets.attention_control); on the way
        out the fused attention alone runs again."""
        if self.attention_control is not None:
            raise RuntimeError("this UNet already has an attention controller")
        if isinstance(control, nn.Module):   # would be registered as a submodule: new keys in the state dict
            raise TypeError("an attention controller must not be an nn.Module")
        keep_out_of_graphs()
        self.attention_control = control
        for layer in self.attention_layers:
            layer.control = control
        try:
            yield control
        finally:
            self.attention_control = None
            for layer in self.attention_layers:
                layer.control = None

    def _run(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])  # [B]
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels, x.dtype).to(x.dtype))  # [B, 4*mc]
        context = context.to(x.dtype)
        h, skips = x, []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)  # [B, out_channels, h, w]
