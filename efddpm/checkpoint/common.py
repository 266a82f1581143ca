"""What every part of the checkpoint loader shares: the error, what a source holds before any model is
built (Weights), and the helpers that word the errors alike. Imports nothing of efddpm.checkpoint."""
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from efddpm.nets.clip import CLIPTextConfig
from efddpm.nets.tokenizer import CLIPTokenizer
from efddpm.nets.unet import UNetConfig
from efddpm.nets.vae import VAEConfig


SD1_IMAGE_SIZE = 512


class CheckpointError(ValueError):
    """A source that cannot be loaded; the message names the file and the problem in one line."""


@dataclass
class Weights:
    """What a source holds, in our names, before any model is built."""
    unet: tuple[UNetConfig, dict]
    vae: tuple[VAEConfig, dict]
    text_encoder: tuple[CLIPTextConfig, dict]
    tokenizer: CLIPTokenizer
    alphas_cumprod: torch.Tensor | None = None
    scheduler_config: dict | None = None
    image_size: int = SD1_IMAGE_SIZE
    defaults: dict = field(default_factory=dict)


def examples(keys: list[str], n: int = 3) -> str:
    """The first n keys, and how many more there are: the way every error lists names."""
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def renamed(tensors: dict, rename: Callable[[str], str], what: str) -> dict:
    """{rename(key): tensor}, refusing two source tensors that land on the same name."""
    out, origin = {}, {}
    for key, t in tensors.items():
        name = rename(key)
        if name in out:
            raise CheckpointError(f"{what}: both {origin[name]} and {key} map to {name}")
        out[name], origin[name] = t, key
    return out


def load_tokenizer(make: Callable[[], CLIPTokenizer], name: str) -> CLIPTokenizer:
    """make(), its file errors turned into a CheckpointError."""
    try:
        return make()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{name}: tokenizer: {first_line(e)}") from None


def width_ratio(width: int, base: int, what: str) -> int:
    """A level's width in units of the base width (a config's channel_mult entry)."""
    if width % base:
        raise CheckpointError(f"{what}: width {width} is not a multiple of the base width {base}")
    return width // base

