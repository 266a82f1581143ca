"""Load Stable Diffusion 1.x weights into efddpm's models, and save them as one file.

    load(source) -> StableDiffusionModels(unet, vae, text_encoder, tokenizer, alphas_cumprod, scheduler_config, source)

`source` is one of
    a single file in the original CompVis/LDM layout (.safetensors; .ckpt/.pt/.pth only through
        torch.load(weights_only=True)): our module names are the file's names, under the prefixes
            model.diffusion_model.                        UNet
            model_ema.diffusion_model<name without dots>   EMA copy of the UNet (full, non-pruned files)
            first_stage_model.                            VAE
            cond_stage_model.transformer.[text_model.]    text encoder
        The configs are inferred from the tensor shapes (what shapes cannot tell, e.g. the number of heads,
        is SD1.x's), unless the file's metadata holds efddpm configs (files written by save_single_file).
    a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), renamed
        by the rules of diffusers_unet_name / diffusers_vae_name / transformers_clip_name, configs taken
        from each config.json;
    a Hugging Face hub repo id ("stable-diffusion-v1-5/stable-diffusion-v1-5") in the diffusers layout,
        through the huggingface_hub cache (revision, offline mode).

Every tensor of every model is filled exactly once from the source, shape checked; anything missing,
unexpected or mis-shaped raises CheckpointError naming the keys. Models are built on the meta device,
so nothing is ever initialised at random.
"""
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants  # a lazy submodule: import it by name
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from efddpm.core.atomic import write_atomically
from efddpm.nets.clip import CLIPTextConfig, CLIPTextModel
from efddpm.method.defaults import MODEL_DEFAULT_KEYS
from efddpm.nets.tokenizer import CLIPTokenizer
from efddpm.nets.unet import UNet, UNetConfig
from efddpm.nets.vae import AutoencoderKL, VAEConfig


SD1_IMAGE_SIZE = 512


class CheckpointError(ValueError):
    """A source that cannot be loaded; the message names the file and the problem in one line."""


@dataclass
class StableDiffusionModels:
    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    alphas_cumprod: torch.Tensor | None  # [1000] as stored in a single file (float32), else None
    scheduler_config: dict | None        # scheduler/scheduler_config.json of a diffusers folder, else None
    source: str
    image_size: int = SD1_IMAGE_SIZE     # the side of the pictures the model was trained on
    defaults: dict = field(default_factory=dict)  # settings the model recommends over the paper's (efddpm.method.defaults)


@dataclass
class _Weights:
    """What a source holds, in our names, before any model is built."""
    unet: tuple[UNetConfig, dict]
    vae: tuple[VAEConfig, dict]
    text_encoder: tuple[CLIPTextConfig, dict]
    tokenizer: CLIPTokenizer
    alphas_cumprod: torch.Tensor | None = None
    scheduler_config: dict | None = None
    image_size: int = SD1_IMAGE_SIZE
    defaults: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------

def load(source: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         revision: str | None = None, offline: bool | None = None, unet_weights: str = "ema") -> StableDiffusionModels:
    """Load the UNet, VAE, text encoder and tokenizer of an SD1.x checkpoint (see the module docstring).

    device, dtype   where and in which floating dtype the weights end up (float16/bfloat16 are meant for CUDA).
    revision        hub only: branch, tag or commit (default "main").
    offline         hub only: use the local cache and nothing else; None follows HF_HUB_OFFLINE.
    unet_weights    "ema" (what SD releases are sampled with) or "raw" (the training weights): picks the
                    UNet copy of a full single file (model_ema.* vs model.diffusion_model.*) or of a diffusers
                    folder (diffusion_pytorch_model.* vs diffusion_pytorch_model.non_ema.*). Files with a
                    single copy (pruned files, most folders) hold the EMA weights, so "raw" needs two copies.
    """
    if unet_weights not in ("ema", "raw"):
        raise CheckpointError(f"unet_weights must be 'ema' or 'raw', not {unet_weights!r}")
    if not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be a floating dtype, not {dtype}")
    prefer_fp16 = dtype == torch.float16
    path, name = Path(source), Path(source).name
    if path.is_file():
        weights = _single_file(path, unet_weights)
    elif path.is_dir():
        weights = _diffusers_folder(path, name, prefer_fp16, unet_weights)
    elif _is_repo_id(str(source)):
        name = str(source)
        weights = _diffusers_folder(_hub_snapshot(name, revision, offline, prefer_fp16, unet_weights),
                                    name, prefer_fp16, unet_weights)
    else:
        raise CheckpointError(f"{source}: no such file or folder (and not a hub repo id of the form org/name)")
    vocab_size = weights.text_encoder[0].vocab_size
    if weights.tokenizer.vocab_size > vocab_size:
        raise CheckpointError(f"{name}: the tokenizer has {weights.tokenizer.vocab_size} tokens, "
                              f"the text encoder embeds only {vocab_size}")
    return StableDiffusionModels(
        unet=_build(UNet, *weights.unet, device, dtype, f"{name}: UNet"),
        vae=_build(AutoencoderKL, *weights.vae, device, dtype, f"{name}: VAE"),
        text_encoder=_build(CLIPTextModel, *weights.text_encoder, device, dtype, f"{name}: text encoder"),
        tokenizer=weights.tokenizer, alphas_cumprod=weights.alphas_cumprod,
        scheduler_config=weights.scheduler_config, source=str(source), image_size=weights.image_size,
        defaults=weights.defaults)


def save_single_file(path: str | os.PathLike, unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                     image_size: int = SD1_IMAGE_SIZE, defaults: dict | None = None) -> None:
    """Write the three models in the original single-file layout as .safetensors, their configs, the training
    image size and the model's recommended settings (`defaults`, keys of efddpm.method.defaults.MODEL_DEFAULT_KEYS) as
    JSON in the metadata, so that load() rebuilds them exactly. The file is replaced atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: save_single_file writes .safetensors files only")
    defaults = _model_defaults(defaults or {}, str(path))
    tensors = {}
    for prefix, model in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (TEXT_PREFIX, text_encoder)):
        tensors |= {prefix + name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    configs = {"unet": asdict(unet.config), "vae": asdict(vae.config), "text_encoder": asdict(text_encoder.config),
               "image_size": image_size, "defaults": defaults}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt",
                                                                       METADATA_KEY: json.dumps(configs)}))


def _model_defaults(values, what: str) -> dict:
    """A model's recommended settings: known keys, finite non-negative numbers."""
    if not isinstance(values, dict):
        raise CheckpointError(f"{what}: defaults must be a dict, got {type(values).__name__}")
    for key, value in values.items():
        if key not in MODEL_DEFAULT_KEYS:
            raise CheckpointError(f"{what}: unknown model default {key!r} (known: {', '.join(MODEL_DEFAULT_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise CheckpointError(f"{what}: model default {key} must be a finite number >= 0, got {value!r}")
    return dict(values)


# ---------------------------------------------------------------------------------------------------
# Filling a model
# ---------------------------------------------------------------------------------------------------

def _build(cls: type[nn.Module], config, tensors: dict, device, dtype: torch.dtype, what: str) -> nn.Module:
    """Build `cls(config)` on the meta device and give every tensor its value from `tensors` (cast)."""
    with torch.device("meta"):
        model = cls(config)
    check_state_dict(model, tensors, what)
    model.load_state_dict({k: t.to(device=device, dtype=dtype) for k, t in tensors.items()}, assign=True)
    unfilled = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unfilled:  # a tensor outside the state dict (non-persistent buffer): the loader cannot fill it
        raise CheckpointError(f"{what}: {_examples(unfilled)} not in the state dict, cannot be loaded")
    return model.eval()


def check_state_dict(model: nn.Module, tensors: dict, what: str) -> None:
    """Raise CheckpointError unless `tensors` has exactly the model's state-dict names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    misshaped = [f"{k} {list(tensors[k].shape)} (model {list(expected[k])})"
                 for k in sorted(expected.keys() & tensors.keys()) if tuple(tensors[k].shape) != expected[k]]
    problems = [f"{len(keys)} {kind} ({_examples(keys)})"
                for kind, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    if problems:
        raise CheckpointError(f"{what} does not match its config: " + "; ".join(problems))


def _examples(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _renamed(tensors: dict, rename, what: str) -> dict:
    """{rename(key): tensor}, refusing two source tensors that land on the same name."""
    out, origin = {}, {}
    for key, t in tensors.items():
        name = rename(key)
        if name in out:
            raise CheckpointError(f"{what}: both {origin[name]} and {key} map to {name}")
        out[name], origin[name] = t, key
    return out


# ---------------------------------------------------------------------------------------------------
# Reading tensor files
# ---------------------------------------------------------------------------------------------------

class _Discarded:
    """Inert stand-in for the training-state objects that Lightning-era .ckpt files pickle next to the
    weights (SD v1.x: the ModelCheckpoint class as a key of "callbacks", numpy float64 scores). Building
    one runs no code of theirs; the values are thrown away with everything outside "state_dict"."""

    def __init__(self, *args):
        pass

    def __setstate__(self, state):
        pass


# Exactly the globals the official SD v1.x .ckpt files need beyond tensors (numpy.core: numpy 1.x, the
# writer's; numpy._core: the same class pickled by numpy 2). _codecs.encode is allowed by torch itself.
LIGHTNING_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint", "numpy.dtype",
                     "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")


def read_tensors(path: Path) -> tuple[dict, dict]:
    """({name: tensor}, safetensors metadata) of a .safetensors file or a torch file (.ckpt/.pt/.pth/.bin)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable .safetensors file (truncated or corrupted?): {e}") from None
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch_file(path), {}
    raise CheckpointError(f"{path}: unknown file type {path.suffix!r} (expected .safetensors or .ckpt)")


def _read_torch_file(path: Path) -> dict:
    """The tensors of a torch.save zip file, unpickled with weights_only=True (plus the inert stand-ins
    above), taken from "state_dict" when nested there (Lightning checkpoints)."""
    if not zipfile.is_zipfile(path):  # every torch.save since torch 1.6 (2020) writes a zip archive
        raise CheckpointError(f"{path}: not a torch zip archive (truncated or corrupted, or a pre-2020 format)")
    try:
        with torch.serialization.safe_globals([(_Discarded, name) for name in LIGHTNING_GLOBALS]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # the pickle itself is broken
            needed = []
        needed = [g for g in needed if g not in LIGHTNING_GLOBALS]
        if not needed:
            raise CheckpointError(f"{path}: unreadable torch file (corrupted?): {_first_line(e)}") from None
        raise CheckpointError(
            f"{path}: unpickling it needs {', '.join(needed)}, and efddpm never unpickles arbitrary objects "
            "(torch.load weights_only=True); convert a file you trust to .safetensors") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable torch file (truncated or corrupted?): {_first_line(e)}") from None
    weights = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: holds a {type(weights).__name__}, not a dict of tensors")
    others = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise CheckpointError(f"{path}: {len(others)} entries are not tensors ({_examples(others)})")
    return weights


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ---------------------------------------------------------------------------------------------------
# Single file, original (CompVis/LDM) layout
# ---------------------------------------------------------------------------------------------------

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema.diffusion_model"  # followed by the UNet name with every dot removed
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
TEXT_PREFIX_SHORT = "cond_stage_model.transformer."  # some community files
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # pickled torch files (read with weights_only)
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


def _single_file(path: Path, unet_weights: str) -> _Weights:
    tensors, metadata = read_tensors(path)
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
        raise CheckpointError(f"{path.name}: {len(unexpected)} unexpected tensors ({_examples(sorted(unexpected))})")
    for part, what in ((unet, f"UNet ({UNET_PREFIX}*)"), (vae, f"VAE ({VAE_PREFIX}*)"),
                       (text, f"text encoder ({TEXT_PREFIX_SHORT}*)")):
        if not part:
            raise CheckpointError(f"{path.name}: no {what} tensors")
    text = _renamed(text, transformers_clip_name, f"{path.name}: text encoder ({TEXT_PREFIX_SHORT}*)")

    configs = _metadata_configs(metadata, path.name)
    unet_config = configs.get("unet") or infer_unet_config(unet, path.name)
    if ema and unet_weights == "ema":
        unet = ema_weights(ema, unet_config, path.name)
    elif unet_weights == "raw" and not ema:
        raise CheckpointError(f"{path.name}: holds a single UNet copy (usually the EMA weights); "
                              f"unet_weights='raw' needs a full file with {EMA_PREFIX}* as well")
    alphas_cumprod = tensors.get("alphas_cumprod")
    return _Weights(
        unet=(unet_config, unet),
        vae=(configs.get("vae") or infer_vae_config(vae, path.name), vae),
        text_encoder=(configs.get("text_encoder") or infer_clip_config(text, path.name), text),
        tokenizer=_tokenizer(CLIPTokenizer.bundled, path.name),
        alphas_cumprod=None if alphas_cumprod is None else alphas_cumprod.clone(),
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
        raise CheckpointError(f"{what}: EMA UNet copy has {len(missing)} missing ({_examples(missing)}) and "
                              f"{len(unexpected)} unexpected tensors ({_examples(unexpected)})")
    return {n: ema[d] for d, n in dotless.items()}


def _metadata_configs(metadata: dict, what: str) -> dict:
    """The configs save_single_file wrote into the metadata, or {} for files without them."""
    if METADATA_KEY not in metadata:
        return {}
    try:
        raw = json.loads(metadata[METADATA_KEY])
        return {"unet": _config(UNetConfig, raw["unet"], what), "vae": _config(VAEConfig, raw["vae"], what),
                "text_encoder": _config(CLIPTextConfig, raw["text_encoder"], what),
                "image_size": int(raw.get("image_size", SD1_IMAGE_SIZE)),
                "defaults": _model_defaults(raw.get("defaults", {}), what)}
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


def _ratio(width: int, base: int, what: str) -> int:
    if width % base:
        raise CheckpointError(f"{what}: width {width} is not a multiple of the base width {base}")
    return width // base


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
        channel_mult=tuple(_ratio(_shape(sd, f"input_blocks.{i}.0.in_layers.2.weight", what)[0], mc, what)
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
        channel_mult=tuple(_ratio(_shape(sd, f"encoder.down.{i}.block.0.conv1.weight", what)[0], conv_in[0], what)
                           for i in levels),
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


# ---------------------------------------------------------------------------------------------------
# diffusers folder
# ---------------------------------------------------------------------------------------------------

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")


def weight_file_candidates(component: str, prefer_fp16: bool, raw_unet: bool) -> list[str]:
    """File names of a component's weights, best first: safetensors before .bin within a variant; the
    full-precision files before the fp16 variant unless loading in float16; the UNet's raw (non-EMA)
    copy only when asked for."""
    stems = ("model", "pytorch_model") if component == "text_encoder" else ("diffusion_pytorch_model",) * 2
    if raw_unet and component == "unet":
        variants = [".non_ema"]
    else:
        variants = [".fp16", ""] if prefer_fp16 else ["", ".fp16"]
    return [f"{stem}{variant}{ext}" for variant in variants for stem, ext in zip(stems, (".safetensors", ".bin"))]


def _diffusers_folder(folder: Path, name: str, prefer_fp16: bool, unet_weights: str) -> _Weights:
    _refuse_other_folder(folder, name)
    unet_json = _read_json(folder / "unet" / "config.json", name)
    unet_config = unet_config_from_diffusers(unet_json, name)
    vae_config = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json", name), name)
    clip_config = clip_config_from_transformers(_read_json(folder / "text_encoder" / "config.json", name), name)
    scheduler_config = _scheduler_config(folder / "scheduler" / "scheduler_config.json", name)
    unet = _renamed(_component_tensors(folder, "unet", name, prefer_fp16, unet_weights == "raw"),
                    lambda k: diffusers_unet_name(k, unet_config), f"{name}: unet")
    vae = _renamed(_component_tensors(folder, "vae", name, prefer_fp16, False),
                   lambda k: diffusers_vae_name(k, len(vae_config.channel_mult)), f"{name}: vae")
    text = {k: t for k, t in _component_tensors(folder, "text_encoder", name, prefer_fp16, False).items()
            if transformers_clip_name(k) != "embeddings.position_ids"}  # rebuilt in forward
    return _Weights(
        unet=(unet_config, unet),
        vae=(vae_config, {n: _conv_1x1(n, t) for n, t in vae.items()}),
        text_encoder=(clip_config, _renamed(text, transformers_clip_name, f"{name}: text_encoder")),
        tokenizer=_tokenizer(lambda: CLIPTokenizer.from_folder(folder / "tokenizer"), name),
        scheduler_config=scheduler_config,
        image_size=(_single_value(unet_json.get("sample_size") or 64, "sample_size", name)  # latent side
                    * 2 ** (len(vae_config.channel_mult) - 1)))


def _first_weights_file(component: str, exists: Callable[[str], bool], name: str, prefer_fp16: bool,
                        raw_unet: bool) -> str:
    """"component/file" of the first candidate weights file that exists (a folder's or a hub repo's)."""
    names = weight_file_candidates(component, prefer_fp16, raw_unet)
    found = next((f"{component}/{n}" for n in names if exists(f"{component}/{n}")), None)
    if found is None:
        raise CheckpointError(f"{name}: no weights in {component}/ (looked for {', '.join(names)})")
    return found


def _component_tensors(folder: Path, component: str, name: str, prefer_fp16: bool, raw_unet: bool) -> dict:
    file = _first_weights_file(component, lambda rel: (folder / rel).is_file(), name, prefer_fp16, raw_unet)
    return read_tensors(folder / file)[0]


def _scheduler_config(path: Path, name: str) -> dict | None:
    """scheduler_config.json, refused if the model does not predict the noise (epsilon) as SD1.x does."""
    if not path.is_file():
        return None
    config = _read_json(path, name)
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"{name}: scheduler/scheduler_config.json has prediction_type="
                              f"{config['prediction_type']!r}; SD1.x predicts 'epsilon' (v-prediction is SD 2.x)")
    return config


def _refuse_other_folder(folder: Path, name: str) -> None:
    """Name what a folder is when it is not a diffusers SD1.x pipeline folder."""
    if (folder / "config.json").is_file():  # one component saved alone
        config = _read_json(folder / "config.json", name)
        kind = config.get("_class_name") or (config.get("architectures") or ["model"])[0]
        raise CheckpointError(f"{name} holds a {kind} alone, not a Stable Diffusion pipeline folder")
    if (folder / "text_encoder_2").is_dir():
        raise CheckpointError(f"{name} is an SDXL pipeline folder (text_encoder_2/), not Stable Diffusion 1.x")
    missing = [f"{c}/" for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise CheckpointError(f"{name}: not a diffusers Stable Diffusion folder, missing {', '.join(missing)}")


def _read_json(path: Path, name: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{name}: {path.parent.name}/{path.name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{name}: {path.parent.name}/{path.name} is not valid JSON ({e})") from None


def _tokenizer(make, name: str) -> CLIPTokenizer:
    try:
        return make()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{name}: tokenizer: {_first_line(e)}") from None


def _conv_1x1(name: str, t: torch.Tensor) -> torch.Tensor:
    """diffusers stores the VAE attention projections as Linear [C, C]; ours are 1x1 convs [C, C, 1, 1]."""
    return t[:, :, None, None] if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", name) and t.ndim == 2 else t


# Renaming rules. Names that no rule matches pass through unchanged (and are then reported as unexpected).

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
    VAE_RULES for the rest. (The attention weights also change shape: see _conv_1x1.)"""
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.", key)
    for pattern, replacement in VAE_RULES:
        key = re.sub(pattern, replacement, key)
    return key


def transformers_clip_name(key: str) -> str:
    """transformers CLIPTextModel name -> ours: drop "text_model." (absent in transformers >= 5 files)."""
    return key.removeprefix("text_model.")


# Configs from config.json; a field left out means diffusers' / transformers' default, as there. Options
# that our models implement only at their SD1.x value: any other value is refused, naming the option (and
# the model family it points to).

UNET_FIXED = {
    "center_input_sample": (False,), "flip_sin_to_cos": (True,), "freq_shift": (0,), "act_fn": ("silu",),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "only_cross_attention": (False,), "downsample_padding": (1,),
    "mid_block_scale_factor": (1,), "norm_eps": (1e-5,), "transformer_layers_per_block": (1,),
    "reverse_transformer_layers_per_block": (None,), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,), "use_linear_projection": (False,), "class_embed_type": (None,),
    "addition_embed_type": (None,), "num_class_embeds": (None,), "upcast_attention": (False,),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",), "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
VAE_FIXED = {"act_fn": ("silu",), "use_quant_conv": (True,), "use_post_quant_conv": (True,),
             "mid_block_add_attention": (True,), "shift_factor": (None,), "latents_mean": (None,),
             "latents_std": (None,)}
CLIP_FIXED = {"hidden_act": ("quick_gelu",), "layer_norm_eps": (1e-5,)}
FAMILY_HINTS = {"use_linear_projection": "SD 2.x", "upcast_attention": "SD 2.1", "addition_embed_type": "SDXL",
                "transformer_layers_per_block": "SDXL", "hidden_act": "SD 2.x (OpenCLIP)", "shift_factor": "SD3/Flux",
                "cross_attention_dim": "SD 2.x (1024) or SDXL (2048)"}


def _refuse_unsupported(cfg: dict, fixed: dict, what: str) -> None:
    for key, allowed in fixed.items():
        value = cfg.get(key, allowed[0])
        ok = value in allowed or (isinstance(value, list) and all(v in allowed for v in value))
        if not ok:
            hint = f", as in {FAMILY_HINTS[key]}" if key in FAMILY_HINTS else ""
            raise CheckpointError(f"{what}: {key}={value!r} is not supported (SD1.x: {allowed[0]!r}{hint})")


def _single_value(value, key: str, what: str):
    """A per-block list whose entries are all equal, or a plain value -> the value."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"{what}: per-level {key}={value} is not supported (one value for all levels)")
        return value[0]
    return value


def unet_config_from_diffusers(cfg: dict, name: str = "unet") -> UNetConfig:
    what = f"{name}: unet/config.json"
    if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise CheckpointError(f"{what}: a {cfg['_class_name']}, not a UNet2DConditionModel")
    if cfg.get("cross_attention_dim", 1280) in (1024, 2048):
        raise CheckpointError(f"{what}: cross_attention_dim={cfg['cross_attention_dim']} is not supported "
                              f"(SD1.x: 768, as in {FAMILY_HINTS['cross_attention_dim']})")
    _refuse_unsupported(cfg, UNET_FIXED, what)
    widths = cfg.get("block_out_channels", [320, 640, 1280, 1280])
    down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    attention_levels = tuple(i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D")
    expected_up = ["CrossAttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(range(len(down)))]
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) or len(down) != len(widths):
        raise CheckpointError(f"{what}: down_block_types={down} is not supported")
    if list(cfg.get("up_block_types", expected_up)) != expected_up:
        raise CheckpointError(f"{what}: up_block_types={cfg['up_block_types']} do not mirror the down blocks "
                              f"({expected_up})")
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4), model_channels=widths[0],
        channel_mult=tuple(_ratio(w, widths[0], what) for w in widths),
        num_res_blocks=_single_value(cfg.get("layers_per_block", 2), "layers_per_block", what),
        attention_levels=attention_levels,
        # diffusers' "attention_head_dim" of SD1.x configs is the number of heads (a known misnomer)
        num_heads=_single_value(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8),
                                "attention_head_dim", what),
        context_dim=cfg.get("cross_attention_dim", 1280), norm_groups=cfg.get("norm_num_groups", 32),
        dropout=cfg.get("dropout", 0.0))


def vae_config_from_diffusers(cfg: dict, name: str = "vae") -> VAEConfig:
    what = f"{name}: vae/config.json"
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"{what}: a {cfg['_class_name']}, not an AutoencoderKL")
    _refuse_unsupported(cfg, VAE_FIXED, what)
    widths = cfg.get("block_out_channels", [64])
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(cfg.get(key, [block] * len(widths))) != [block] * len(widths):
            raise CheckpointError(f"{what}: {key}={cfg[key]} is not supported (only {block})")
    if cfg.get("in_channels", 3) != cfg.get("out_channels", 3):
        raise CheckpointError(f"{what}: in_channels {cfg['in_channels']} != out_channels {cfg['out_channels']}")
    return VAEConfig(
        image_channels=cfg.get("in_channels", 3), base_channels=widths[0],
        channel_mult=tuple(_ratio(w, widths[0], what) for w in widths), num_res_blocks=cfg.get("layers_per_block", 1),
        latent_channels=cfg.get("latent_channels", 4), norm_groups=cfg.get("norm_num_groups", 32),
        scaling_factor=cfg.get("scaling_factor", VAEConfig.scaling_factor))


def clip_config_from_transformers(cfg: dict, name: str = "text_encoder") -> CLIPTextConfig:
    what = f"{name}: text_encoder/config.json"
    architectures = cfg.get("architectures") or ["CLIPTextModel"]
    if architectures != ["CLIPTextModel"]:
        raise CheckpointError(f"{what}: architectures={architectures} is not supported (SD1.x: ['CLIPTextModel'])")
    _refuse_unsupported(cfg, CLIP_FIXED, what)
    return CLIPTextConfig(
        vocab_size=cfg.get("vocab_size", 49408), context_length=cfg.get("max_position_embeddings", 77),
        width=cfg.get("hidden_size", 512), layers=cfg.get("num_hidden_layers", 12),
        heads=cfg.get("num_attention_heads", 8), mlp_width=cfg.get("intermediate_size", 2048))


# ---------------------------------------------------------------------------------------------------
# Hugging Face hub
# ---------------------------------------------------------------------------------------------------

# tokenizer/: tokenizer.json (diffusers folders saved with transformers >= 5) or vocab.json + merges.txt (older
# ones, the hub's SD1.5): whichever the repo has is fetched, CLIPTokenizer.from_folder picks
HUB_CONFIG_FILES = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                    "tokenizer/tokenizer.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                    "scheduler/scheduler_config.json"]


def _is_repo_id(s: str) -> bool:
    """"org/name", not a path to a missing file ("./x", "dir/model.ckpt")."""
    looks_like_file = s.startswith(".") or s.endswith((".safetensors", *TORCH_SUFFIXES))
    return re.fullmatch(r"[\w.-]+/[\w.-]+", s) is not None and not looks_like_file


def _hub_snapshot(repo_id: str, revision: str | None, offline: bool | None, prefer_fp16: bool,
                  unet_weights: str) -> Path:
    """Local folder of the repo's diffusers files, downloaded (only the files load() reads) or from the cache."""
    offline = huggingface_hub.constants.HF_HUB_OFFLINE if offline is None else offline
    reason = "offline mode is on"
    patterns = list(HUB_CONFIG_FILES)
    if not offline:
        try:
            remote = {s.rfilename for s in huggingface_hub.HfApi().model_info(repo_id, revision=revision).siblings}
        except Exception as e:  # unreachable, unknown, gated...: fall back to the cache, as huggingface_hub does
            offline, reason = True, f"the hub answered {type(e).__name__}: {_first_line(e)}"
        else:
            patterns += _pick_hub_weights(remote, repo_id, prefer_fp16, unet_weights)
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                                      local_files_only=offline))
    except (OSError, ValueError) as e:
        if offline:
            cache = huggingface_hub.constants.HF_HUB_CACHE
            raise CheckpointError(f"{repo_id}: no such local path, and as a hub repo (revision {revision or 'main'}) "
                                  f"it is not in the cache {cache} and {reason}") from None
        raise CheckpointError(f"{repo_id}: download failed: {type(e).__name__}: {_first_line(e)}") from None


def _pick_hub_weights(remote: set[str], repo_id: str, prefer_fp16: bool, unet_weights: str) -> list[str]:
    """Repo paths of the weights files to download: the first existing candidate of each component."""
    if "unet/config.json" not in remote:
        singles = sorted(f for f in remote if f.endswith((".safetensors", ".ckpt")) and "/" not in f)
        raise CheckpointError(f"{repo_id} has no diffusers layout (unet/config.json)"
                              + (f"; download one of its single files ({_examples(singles)}) and load that path"
                                 if singles else ""))
    return [_first_weights_file(component, remote.__contains__, repo_id, prefer_fp16, unet_weights == "raw")
            for component in ("unet", "vae", "text_encoder")]
