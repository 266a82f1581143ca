"""Attention control: read or replace the attention probabilities of the UNet's layers (what Prompt-to-Prompt needs).

Every attention layer of the UNet (efddpm.nets.unet.CrossAttention) knows where it sits: its AttentionSite. With no
controller set, a layer runs the fused F.scaled_dot_product_attention and nothing else: its probabilities are never
materialised. Within `with unet.controlled(control):` each layer first asks `control.wants(site, queries, keys)`;
where the answer is yes, it computes the probabilities explicitly,

    P = softmax(Q K^T / sqrt(d))          [B, heads, queries, keys]   (P2P, Sec. 3.1: the attention map M)

hands them to `control(site, P)`, and uses what comes back: out = P' V. A controller may read P (observe) and return
it, or return other probabilities of the same shape (replace). Where the answer is no, the layer runs the fused path,
exactly as without a controller.

A controller is any object with the two methods of AttentionControl (a base class that asks for nothing). The UNet
knows nothing of diffusion steps: one UNet call is one step of a sampler, and whoever runs the sampler tells its
controller which step it is (efddpm.method.p2p counts them in its step callback).

Cost. Without a controller: none (one `is None` test per layer; torch.compile guards on it, a CUDA graph never sees
it). With one: a call of `wants` per layer and call, and explicit probabilities only where it answers yes. Under
torch.compile the controller's two calls run outside the compiled graphs (efddpm.nets.unet.ask and hand_over): the
graph breaks around them, and a controller's state (a step counter) never becomes a guard that recompiles the UNet.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PLACES = ("down", "mid", "up")


@dataclass(frozen=True)
class AttentionSite:
    """Where an attention layer sits in the UNet."""
    place: str    # "down" (input blocks), "mid" (middle block) or "up" (output blocks)
    level: int    # resolution level: 0 = the latent's size, each level halves it; the middle block is the deepest
    cross: bool   # True: cross-attention to the text (keys = the 77 tokens); False: self-attention (keys = pixels)
    index: int    # call order among the UNet's layers of the same kind (self or cross), from 0

    @property
    def name(self) -> str:
        """"down_cross", "mid_self", ...: the keys of the reference P2P code's attention store."""
        return f"{self.place}_{'cross' if self.cross else 'self'}"


class AttentionControl:
    """The controller protocol, asking for nothing: subclass it, or give any object these two methods."""

    def wants(self, site: AttentionSite, queries: int, keys: int) -> bool:
        """Whether the layer at `site` should compute its probabilities explicitly and hand them over, in this call
        (queries: pixels of the layer's map; keys: pixels, or text tokens for cross-attention)."""
        return False

    def __call__(self, site: AttentionSite, probs: Tensor) -> Tensor:
        """Observe `probs` [B, heads, queries, keys] and return them, or return replacements of the same shape."""
        return probs


def attention_probabilities(q: Tensor, k: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)): the probabilities the fused attention uses without materialising them.
    q [B, heads, N, d], k [B, heads, M, d] -> [B, heads, N, M], computed in at least float32 (half-precision scores
    of SD1.x overflow), float64 for a float64 UNet."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(dtype) * q.shape[-1] ** -0.5) @ k.to(dtype).transpose(-1, -2)   # [B, heads, N, M]
    return scores.softmax(dim=-1)
