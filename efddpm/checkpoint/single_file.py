"""The original (CompVis/LDM) single-file layout: one file holds the three models under fixed prefixes,
in the names our modules mirror:
    model.diffusion_model.                        UNet
    model_ema.diffusion_model<name without dots>   EMA copy of the UNet (full, non-pruned files)
    first_stage_model.                            VAE
    cond_stage_model.transformer.[text_model.]    text encoder
The configs are inferred from the tensor shapes (what shapes cannot tell, e.g. the number of heads, is
SD1.x's), unless the file's metadata holds efddpm configs (files written by save_single_file). Files of
other model families are refused by name."""
import json
import re
from dataclasses import fields, replace
from pathlib import Path

import torch

from efddpm.checkpoint.common import (SD1_IMAGE_SIZE, CheckpointError, Weights, examples, load_tokenizer, renamed,
                                      width_ratio)
from efddpm.checkpoint.names import transformers_clip_name
from efddpm.checkpoint.tensors import read_tensors
from efddpm.method.defaults import MODEL_DEFAULT_KEYS, MODEL_DEFAULT_RANGES
from efddpm.nets.clip import CLIPTextConfig
from efddpm.nets.tokenizer import CLIPTokenizer
from efddpm.nets.unet import UNet, UNetConfig
from efddpm.nets.vae import VAEConfig


UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema.diffusion_model"  # followed by the UNet name with every dot removed
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
TEXT_PREFIX_SHORT = "cond_stage_model.transformer."  # some community files
METADATA_KEY = "efddpm"  # safetensors metadata: JSON {"unet": ..., "vae": ..., "text_encoder": ...} configs

SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
# Known tensors that are not weights of our models. position_ids is rebuilt in forward: merged community
# files often carry it float-corrupted.
IGNORED_KEYS = frozenset(SCHEDULE_BUFFERS + (
    "logvar", "model_ema.decay", "model_ema.num_updates",
    TEXT_PREFIX + "embeddings.position_ids", TEXT_PREFIX_SHORT + "embeddings.position_ids"))

# Key prefixes (or shapes) that mark another model family: refused by name rather than reported as a
# pile of unexpected keys.
OTHER_FAMILIES = (
    ("conditioner.embedders.", "an SDXL checkpoint"),
    ("cond_stage_model.model.", "an SD 2.x checkpoint (OpenCLIP text encoder)"),
    ("lora_unet_", "a LoRA"),
    ("lora_te", "a LoRA"),
)


def read_single_file(path: Path, *, unet_weights: str, device=None) -> Weights:
    """The weights and configs of a single file; unet_weights "ema" or "raw" as in load(); device: where to read
    the tensors to (efddpm.checkpoint.tensors.read_tensors)."""
    tensors, metadata = read_tensors(path, device)
    _refuse_other_family(tensors, path.name)
    unet, ema, vae, text, unexpected = {}, {}, {}, {}, []
    for key, t in tensors.items():
        if key in IGNORED_KEYS:
            continue
        for prefix, part in ((UNET_PREFIX, unet), (EMA_PREFIX, ema), (VAE_PREFIX, vae), (TEXT_PREFIX_SHORT, text)):
            if key.startswith(prefix):
                part[key[len(prefix):]] = t
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"{path.name}: {len(unexpected)} unexpected tensors ({examples(sorted(unexpected))})")
    for part, what in ((unet, f"UNet ({UNET_PREFIX}*)"), (vae, f"VAE ({VAE_PREFIX}*)"),
                       (text, f"text encoder ({TEXT_PREFIX_SHORT}*)")):
        if not part:
            raise CheckpointError(f"{path.name}: no {what} tensors")
    text = renamed(text, transformers_clip_name, f"{path.name}: text encoder ({TEXT_PREFIX_SHORT}*)")

    configs = _metadata_configs(metadata, path.name)
    unet_config = configs.get("unet") or infer_unet_config(unet, path.name)
    if ema and unet_weights == "ema":
        unet = ema_weights(ema, unet_config, path.name)
    elif unet_weights == "raw" and not ema:
        raise CheckpointError(f"{path.name}: holds a single UNet copy (usually the EMA weights); "
                              f"unet_weights='raw' needs a full file with {EMA_PREFIX}* as well")
    alphas_cumprod = tensors.get("alphas_cumprod")
    return Weights(
        unet=(unet_config, unet),
        vae=(configs.get("vae") or infer_vae_config(vae, path.name), vae),
        text_encoder=(configs.get("text_encoder") or infer_clip_config(text, path.name), text),
        tokenizer=load_tokenizer(CLIPTokenizer.bundled, path.name),
        alphas_cumprod=None if alphas_cumprod is None else alphas_cumprod.cpu().clone(),
        image_size=configs.get("image_size", SD1_IMAGE_SIZE), defaults=configs.get("defaults", {}))


def _refuse_other_family(tensors: dict, name: str) -> None:
    for prefix, family in OTHER_FAMILIES:
        if any(k.startswith(prefix) for k in tensors):
            raise CheckpointError(f"{name} is {family} ({prefix}* keys), not Stable Diffusion 1.x")
    for key, t in tensors.items():
        if key.endswith("attn2.to_k.weight") and t.shape[-1] == 1024:
            raise CheckpointError(f"{name} is an SD 2.x checkpoint (cross-attention width 1024 in {key}), "
                                  "not Stable Diffusion 1.x")
        if key.startswith(UNET_PREFIX) and key.endswith("proj_in.weight") and t.ndim == 2:
            raise CheckpointError(f"{name} is an SD 2.x-style UNet (linear proj_in in {key}), not Stable Diffusion 1.x")
    if not any(k.startswith((UNET_PREFIX, EMA_PREFIX)) for k in tensors):
        if any(k.startswith((VAE_PREFIX, "encoder.", "decoder.")) for k in tensors):
            raise CheckpointError(f"{name} holds a VAE alone (no {UNET_PREFIX}* tensors), not a full SD1.x checkpoint")
        raise CheckpointError(f"{name} is not a Stable Diffusion checkpoint (no {UNET_PREFIX}* tensors)")


def ema_weights(ema: dict, config: UNetConfig, what: str) -> dict:
    """The EMA copy in our names: each UNet name n is stored as model_ema.diffusion_model + n without dots.
    Mapped from the model's names to the EMA names, so the (lossy) dot removal never needs inverting."""
    with torch.device("meta"):
        names = list(UNet(config).state_dict())
    dotless = {n.replace(".", ""): n for n in names}
    if len(dotless) != len(names):
        raise CheckpointError(f"{what}: two UNet names coincide without their dots; EMA weights are ambiguous")
    missing = sorted(EMA_PREFIX + d for d in dotless.keys() - ema.keys())
    unexpected = sorted(EMA_PREFIX + d for d in ema.keys() - dotless.keys())
    if missing or unexpected:
        raise CheckpointError(f"{what}: EMA UNet copy has {len(missing)} missing ({examples(missing)}) and "
                              f"{len(unexpected)} unexpected tensors ({examples(unexpected)})")
    return {n: ema[d] for d, n in dotless.items()}


# Metadata: the configs, training image size and model defaults that save_single_file writes.

def model_defaults(values, what: str) -> dict:
    """A model's recommended settings: known keys, finite non-negative numbers."""
    if not isinstance(values, dict):
        raise CheckpointError(f"{what}: defaults must be a dict, got {type(values).__name__}")
    for key, value in values.items():
        if key not in MODEL_DEFAULT_KEYS:
            raise CheckpointError(f"{what}: unknown model default {key!r} (known: {', '.join(MODEL_DEFAULT_KEYS)})")
        high = MODEL_DEFAULT_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
            raise CheckpointError(f"{what}: model default {key} must be a number in [0, {high:g}], got {value!r}")
    return dict(values)


def _metadata_configs(metadata: dict, what: str) -> dict:
    """The configs save_single_file wrote into the metadata, or {} for files without them."""
    if METADATA_KEY not in metadata:
        return {}
    try:
        raw = json.loads(metadata[METADATA_KEY])
        return {"unet": _config(UNetConfig, raw["unet"], what), "vae": _config(VAEConfig, raw["vae"], what),
                "text_encoder": _config(CLIPTextConfig, raw["text_encoder"], what),
                "image_size": int(raw.get("image_size", SD1_IMAGE_SIZE)),
                "defaults": model_defaults(raw.get("defaults", {}), what)}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: unreadable efddpm config in the file's metadata ({e!r})") from None


def _config(cls, values: dict, what: str):
    """A config dataclass from a JSON dict; lists become tuples, unknown fields are refused."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(values.keys() - known)
    if unknown:
        raise CheckpointError(f"{what}: {cls.__name__} has no field {', '.join(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# Configs from shapes. Shapes fix every size; num_heads / heads / norm_groups / scaling_factor / dropout
# cannot be read from them and keep SD1.x's values.

def _shape(sd: dict, key: str, what: str) -> torch.Size:
    if key not in sd:
        raise CheckpointError(f"{what}: cannot infer the config, tensor {key} is missing")
    return sd[key].shape


def _indices(sd: dict, pattern: str) -> set[int]:
    """The distinct integers captured by `pattern` (one group) over the names of sd."""
    return {int(m[1]) for k in sd if (m := re.match(pattern, k))}


def infer_unet_config(sd: dict, name: str) -> UNetConfig:
    what = f"{name}: UNet ({UNET_PREFIX}*)"
    conv_in = _shape(sd, "input_blocks.0.0.weight", what)  # [model_channels, in_channels, 3, 3]
    mc = conv_in[0]
    levels = len(_indices(sd, r"input_blocks\.(\d+)\.0\.op\.weight")) + 1
    n_out = len(_indices(sd, r"output_blocks\.(\d+)\."))
    if n_out % levels:
        raise CheckpointError(f"{what}: {n_out} output blocks do not split into {levels} levels")
    per_level = n_out // levels  # num_res_blocks + 1
    first = [1 + level * per_level for level in range(levels)]  # first input block of each level
    return replace(
        UNetConfig(), in_channels=conv_in[1], out_channels=_shape(sd, "out.2.weight", what)[0], model_channels=mc,
        channel_mult=tuple(width_ratio(_shape(sd, f"input_blocks.{i}.0.in_layers.2.weight", what)[0], mc, what)
                           for i in first),
        num_res_blocks=per_level - 1,
        attention_levels=tuple(level for level, i in enumerate(first) if f"input_blocks.{i}.1.proj_in.weight" in sd),
        context_dim=next((t.shape[1] for k, t in sd.items() if k.endswith("attn2.to_k.weight")),
                         UNetConfig.context_dim))


def infer_vae_config(sd: dict, name: str) -> VAEConfig:
    what = f"{name}: VAE ({VAE_PREFIX}*)"
    conv_in = _shape(sd, "encoder.conv_in.weight", what)  # [base_channels, image_channels, 3, 3]
    levels = sorted(_indices(sd, r"encoder\.down\.(\d+)\."))
    return replace(
        VAEConfig(), image_channels=conv_in[1], base_channels=conv_in[0],
        channel_mult=tuple(width_ratio(_shape(sd, f"encoder.down.{i}.block.0.conv1.weight", what)[0], conv_in[0],
                                       what) for i in levels),
        num_res_blocks=len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
        latent_channels=_shape(sd, "post_quant_conv.weight", what)[0])


def infer_clip_config(sd: dict, name: str) -> CLIPTextConfig:
    what = f"{name}: text encoder ({TEXT_PREFIX}*)"
    vocab_size, width = _shape(sd, "embeddings.token_embedding.weight", what)
    return replace(
        CLIPTextConfig(), vocab_size=vocab_size, width=width,
        context_length=_shape(sd, "embeddings.position_embedding.weight", what)[0],
        layers=len(_indices(sd, r"encoder\.layers\.(\d+)\.")),
        mlp_width=_shape(sd, "encoder.layers.0.mlp.fc1.weight", what)[0])
