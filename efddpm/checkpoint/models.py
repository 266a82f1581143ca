"""The entry points: load() picks the reader of a source (single file, diffusers folder, hub repo id) and
fills the three models from what it holds; save_single_file() writes them back as one file. Every
tensor of every model is filled exactly once, shape checked, on models built on the meta device."""
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from efddpm.checkpoint.common import SD1_IMAGE_SIZE, CheckpointError, examples
from efddpm.checkpoint.diffusers import read_diffusers_folder
from efddpm.checkpoint.hub import hub_snapshot, is_repo_id
from efddpm.checkpoint.single_file import (METADATA_KEY, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, model_defaults,
                                           read_single_file)
from efddpm.core.atomic import write_atomically
from efddpm.nets.clip import CLIPTextModel
from efddpm.nets.tokenizer import CLIPTokenizer
from efddpm.nets.unet import UNet
from efddpm.nets.vae import AutoencoderKL


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


def load(source: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         revision: str | None = None, offline: bool | None = None, unet_weights: str = "ema") -> StableDiffusionModels:
    """Load the UNet, VAE, text encoder and tokenizer of an SD1.x checkpoint (see efddpm.checkpoint).

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
        weights = read_single_file(path, unet_weights=unet_weights, device=device)
    elif path.is_dir():
        weights = read_diffusers_folder(path, name, prefer_fp16=prefer_fp16, unet_weights=unet_weights, device=device)
    elif is_repo_id(str(source)):
        name = str(source)
        folder = hub_snapshot(name, revision=revision, offline=offline, prefer_fp16=prefer_fp16,
                              unet_weights=unet_weights)
        weights = read_diffusers_folder(folder, name, prefer_fp16=prefer_fp16, unet_weights=unet_weights,
                                        device=device)
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


def save_single_file(path: str | os.PathLike, unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel, *,
                     image_size: int = SD1_IMAGE_SIZE, defaults: dict | None = None) -> None:
    """Write the three models in the original single-file layout as .safetensors, their configs, the training
    image size and the model's recommended settings (`defaults`, keys of efddpm.method.defaults.MODEL_DEFAULT_KEYS) as
    JSON in the metadata, so that load() rebuilds them exactly. The file is replaced atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: save_single_file writes .safetensors files only")
    defaults = model_defaults(defaults or {}, str(path))
    tensors = {}
    for prefix, model in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (TEXT_PREFIX, text_encoder)):
        tensors |= {prefix + name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    configs = {"unet": asdict(unet.config), "vae": asdict(vae.config), "text_encoder": asdict(text_encoder.config),
               "image_size": image_size, "defaults": defaults}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt",
                                                                       METADATA_KEY: json.dumps(configs)}))


def _build(cls: type[nn.Module], config, tensors: dict, device, dtype: torch.dtype, what: str) -> nn.Module:
    """Build `cls(config)` on the meta device and give every tensor its value from `tensors` (cast)."""
    with torch.device("meta"):
        model = cls(config)
    check_state_dict(model, tensors, what)
    model.load_state_dict({k: placed(t, device, dtype) for k, t in tensors.items()}, assign=True)
    unfilled = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unfilled:  # a tensor outside the state dict (non-persistent buffer): the loader cannot fill it
        raise CheckpointError(f"{what}: {examples(unfilled)} not in the state dict, cannot be loaded")
    return model.eval()


def placed(t: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """t on `device` in `dtype`: moved first, then cast there (on a GPU, not in host memory). Off the CPU it holds its
    own memory: a view of a larger buffer (a file's data read whole to the GPU) is copied, so the buffer can go."""
    moved = t.to(device)
    out = moved.to(dtype)
    if out.device.type != "cpu" and out.untyped_storage().nbytes() > out.nbytes:
        out = out.clone()
    return out


def check_state_dict(model: nn.Module, tensors: dict, what: str) -> None:
    """Raise CheckpointError unless `tensors` has exactly the model's state-dict names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    misshaped = [f"{k} {list(tensors[k].shape)} (model {list(expected[k])})"
                 for k in sorted(expected.keys() & tensors.keys()) if tuple(tensors[k].shape) != expected[k]]
    problems = [f"{len(keys)} {kind} ({examples(keys)})"
                for kind, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    if problems:
        raise CheckpointError(f"{what} does not match its config: " + "; ".join(problems))
