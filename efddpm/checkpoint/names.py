"""The renaming rules: diffusers' UNet and VAE names and transformers' CLIP names -> ours (the names of
the original single file). Names that no rule matches pass through unchanged (and are then reported as
unexpected)."""
import re

import torch

from efddpm.nets.unet import UNetConfig


RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP_NAMES = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                  "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
UNET_BLOCK = re.compile(r"(?:(down|up)_blocks\.(\d+)|mid_block)"
                        r"\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")


def diffusers_unet_name(key: str, c: UNetConfig) -> str:
    """diffusers UNet2DConditionModel name -> ours. R = num_res_blocks, L = levels; down level i has R
    resnet(+attention) blocks then a downsampler, up level i (deepest first) R + 1 blocks, the last one
    ending with an upsampler:
        down_blocks.i.{resnets|attentions}.j   input_blocks.(1 + i(R+1) + j).{0|1}
        down_blocks.i.downsamplers.0.conv      input_blocks.((i+1)(R+1)).0.op
        mid_block.resnets.0 / attentions.0 / resnets.1   middle_block.0 / 1 / 2
        up_blocks.i.{resnets|attentions}.j     output_blocks.(i(R+1) + j).{0|1}
        up_blocks.i.upsamplers.0.conv          output_blocks.(i(R+1) + R).{1, or 2 after an attention}.conv
    Resnet parts follow RESNET_NAMES, the rest UNET_TOP_NAMES; transformer internals keep their names."""
    m = UNET_BLOCK.fullmatch(key)
    if m is None:
        for old, new in UNET_TOP_NAMES.items():
            if key.startswith(old + "."):
                return new + key[len(old):]
        return key
    side, i, kind, j, rest = m[1], int(m[2] or 0), m[3], int(m[4]), m[5]
    if kind == "resnets":
        part, dot, tail = rest.partition(".")
        rest = RESNET_NAMES.get(part, part) + dot + tail
    R = c.num_res_blocks
    if side is None:  # mid_block
        return f"middle_block.{2 * j if kind == 'resnets' else 1}.{rest}"
    slot = 0 if kind == "resnets" else 1
    if side == "down":
        if kind == "downsamplers":
            return f"input_blocks.{(i + 1) * (R + 1)}.0.{rest.replace('conv.', 'op.', 1)}"
        return f"input_blocks.{1 + i * (R + 1) + j}.{slot}.{rest}"
    if kind == "upsamplers":
        level = len(c.channel_mult) - 1 - i
        return f"output_blocks.{i * (R + 1) + R}.{2 if level in c.attention_levels else 1}.{rest}"
    return f"output_blocks.{i * (R + 1) + j}.{slot}.{rest}"


VAE_RULES = [  # (pattern, replacement), applied in order; the decoder's level reversal is done in code
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
    (r"\.attn_1\.(?:to_q|query)\.", ".attn_1.q."),  # query/key/value/proj_attn: diffusers < 0.15 files
    (r"\.attn_1\.(?:to_k|key)\.", ".attn_1.k."),
    (r"\.attn_1\.(?:to_v|value)\.", ".attn_1.v."),
    (r"\.attn_1\.(?:to_out\.0|proj_attn)\.", ".attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
]


def diffusers_vae_name(key: str, levels: int) -> str:
    """diffusers AutoencoderKL name -> ours: down_blocks.i -> down.i (resnets -> block, downsamplers.0 ->
    downsample), decoder up_blocks.i -> up.(levels-1-i) (upsamplers.0 -> upsample), mid_block -> mid, and
    VAE_RULES for the rest. (The attention weights also change shape: see conv_1x1.)"""
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.", key)
    for pattern, replacement in VAE_RULES:
        key = re.sub(pattern, replacement, key)
    return key


def conv_1x1(name: str, t: torch.Tensor) -> torch.Tensor:
    """diffusers stores the VAE attention projections as Linear [C, C]; ours are 1x1 convs [C, C, 1, 1]."""
    return t[:, :, None, None] if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", name) and t.ndim == 2 else t


def transformers_clip_name(key: str) -> str:
    """transformers CLIPTextModel name -> ours: drop "text_model." (absent in transformers >= 5 files)."""
    return key.removeprefix("text_model.")
