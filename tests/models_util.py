"""Shared test helpers: small configs, random weights, the diffusers/transformers twins of our models."""
import json
import math
from pathlib import Path

import torch

from efddpm.nets.clip import CLIPTextConfig
from efddpm.nets.tokenizer import bundled_vocab_and_merges
from efddpm.nets.unet import UNetConfig
from efddpm.nets.vae import VAEConfig

FIXTURES = Path(__file__).parent / "fixtures" / "sd1-keys"  # tensor names and shapes of the real SD1 files

# Small configs, one per purpose: the tests' thresholds and measured numbers were taken on these, so a change
# means measuring again.
# The networks' own tests (parity with diffusers / transformers, dtypes, compile, training, file metadata):
SMALL_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1),
                        num_heads=2, context_dim=24, norm_groups=8)
SMALL_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
SMALL_CLIP = CLIPTextConfig(vocab_size=1000, width=64, layers=3, heads=4, mlp_width=128)
# UNet parity without attention at the top level, and with other than 4 channels in and out:
UNET_WITHOUT_TOP_ATTENTION = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                        attention_levels=(1,), num_heads=4, context_dim=8, norm_groups=4,
                                        in_channels=3, out_channels=5)
# Checkpoint round trips: what the shapes cannot tell (heads, norm groups) is SD1.x's, so files without metadata
# load into the same configs; the real vocabulary, so tokenizer ids fit:
SD1_LIKE_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1),
                           context_dim=48)
SD1_LIKE_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)
SD1_LIKE_CLIP = CLIPTextConfig(width=48, layers=2, heads=12, mlp_width=96)
# The method's tests: a UNet fast enough as a float64 noise predictor (inversion_util.py); with CLI_VAE and CLI_CLIP
# it is also the model file of the command-line and bad-input tests (conftest.py, 32x32 pictures):
METHOD_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                         num_heads=2, context_dim=32, norm_groups=8)
CLI_VAE = VAEConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
CLI_CLIP = CLIPTextConfig(width=32, layers=1, heads=2, mlp_width=64)
# The fast path's tests (test_fast_path.py), narrower still:
FAST_PATH_UNET = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                            num_heads=2, context_dim=16, norm_groups=4)


def fixture_shapes(name: str) -> dict[str, list[int]]:
    """{tensor name: shape} from one of the real checkpoint's key lists."""
    shapes = {}
    for line in (FIXTURES / name).read_text().splitlines():
        key, shape = line.split(" ", 1)
        shapes[key] = [int(n) for n in shape.strip("[]").split(",")]
    return shapes


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter with seeded random values of a sane scale (norm weights near 1, biases small),
    also for modules built on the meta device."""
    gen = torch.Generator().manual_seed(seed)
    if any(p.is_meta for p in module.parameters()):
        module.to_empty(device="cpu")
    for name, p in module.named_parameters():
        if p.ndim >= 2:  # linear / conv / embedding: variance 1 / fan_in
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))
        elif "norm" in name:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen) if name.endswith("weight")
                    else 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return module


def diffusers_unet_config(c: UNetConfig) -> dict:
    """The UNet2DConditionModel arguments describing the same network as our UNetConfig."""
    levels = range(len(c.channel_mult))
    return dict(
        in_channels=c.in_channels, out_channels=c.out_channels, layers_per_block=c.num_res_blocks,
        block_out_channels=tuple(m * c.model_channels for m in c.channel_mult),
        down_block_types=tuple("CrossAttnDownBlock2D" if i in c.attention_levels else "DownBlock2D" for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in c.attention_levels else "UpBlock2D" for i in reversed(levels)),
        cross_attention_dim=c.context_dim, attention_head_dim=c.num_heads, norm_num_groups=c.norm_groups,
    )


def diffusers_vae_config(c: VAEConfig) -> dict:
    n = len(c.channel_mult)
    return dict(
        in_channels=c.image_channels, out_channels=c.image_channels, latent_channels=c.latent_channels,
        block_out_channels=tuple(m * c.base_channels for m in c.channel_mult), layers_per_block=c.num_res_blocks,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=c.norm_groups, scaling_factor=c.scaling_factor,
    )


def transformers_clip_config(c: CLIPTextConfig):
    from transformers import CLIPTextConfig as HFConfig
    return HFConfig(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_width,
                    num_hidden_layers=c.layers, num_attention_heads=c.heads, max_position_embeddings=c.context_length,
                    hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def write_tokenizer_folder(path: Path) -> Path:
    """A diffusers-style tokenizer/ folder (vocab.json, merges.txt) written from the shipped merges file."""
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = bundled_vocab_and_merges()
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return path
