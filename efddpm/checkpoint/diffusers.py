"""diffusers pipeline folders (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/):
which weights file each component is read from, the translation of each config.json to our configs, and
the tensors renamed to ours by the rules of efddpm.checkpoint.names."""
import json
from collections.abc import Callable
from pathlib import Path

from efddpm.checkpoint.common import CheckpointError, Weights, load_tokenizer, renamed, width_ratio
from efddpm.checkpoint.names import conv_1x1, diffusers_unet_name, diffusers_vae_name, transformers_clip_name
from efddpm.checkpoint.tensors import read_tensors
from efddpm.nets.clip import CLIPTextConfig
from efddpm.nets.tokenizer import CLIPTokenizer
from efddpm.nets.unet import UNetConfig
from efddpm.nets.vae import VAEConfig


COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")


def read_diffusers_folder(folder: Path, name: str, *, prefer_fp16: bool, unet_weights: str, device=None) -> Weights:
    """The weights and configs of a diffusers folder; prefer_fp16 and unet_weights pick the weights files
    (see weight_file_candidates); device: where to read the tensors to (efddpm.checkpoint.tensors.read_tensors)."""
    _refuse_other_folder(folder, name)
    unet_json = _read_json(folder / "unet" / "config.json", name)
    unet_config = unet_config_from_diffusers(unet_json, name)
    vae_config = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json", name), name)
    clip_config = clip_config_from_transformers(_read_json(folder / "text_encoder" / "config.json", name), name)
    scheduler_config = _scheduler_config(folder / "scheduler" / "scheduler_config.json", name)
    unet = _component_tensors(folder, "unet", name, prefer_fp16=prefer_fp16, raw_unet=unet_weights == "raw",
                              device=device)
    unet = renamed(unet, lambda k: diffusers_unet_name(k, unet_config), f"{name}: unet")
    vae = _component_tensors(folder, "vae", name, prefer_fp16=prefer_fp16, device=device)
    vae = renamed(vae, lambda k: diffusers_vae_name(k, len(vae_config.channel_mult)), f"{name}: vae")
    text = {k: t for k, t in _component_tensors(folder, "text_encoder", name, prefer_fp16=prefer_fp16,
                                                 device=device).items()
            if transformers_clip_name(k) != "embeddings.position_ids"}  # rebuilt in forward
    return Weights(
        unet=(unet_config, unet),
        vae=(vae_config, {n: conv_1x1(n, t) for n, t in vae.items()}),
        text_encoder=(clip_config, renamed(text, transformers_clip_name, f"{name}: text_encoder")),
        tokenizer=load_tokenizer(lambda: CLIPTokenizer.from_folder(folder / "tokenizer"), name),
        scheduler_config=scheduler_config,
        image_size=(_single_value(unet_json.get("sample_size") or 64, "sample_size", name)  # latent side
                    * 2 ** (len(vae_config.channel_mult) - 1)))


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


def _scheduler_config(path: Path, name: str) -> dict | None:
    """scheduler_config.json, refused if the model does not predict the noise (epsilon) as SD1.x does."""
    if not path.is_file():
        return None
    config = _read_json(path, name)
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"{name}: scheduler/scheduler_config.json has prediction_type="
                              f"{config['prediction_type']!r}; SD1.x predicts 'epsilon' (v-prediction is SD 2.x)")
    return config


# Weights files. A component may hold several: the rules below pick one, in a folder and in a hub repo alike.

def weight_file_candidates(component: str, *, prefer_fp16: bool, raw_unet: bool) -> list[str]:
    """File names of a component's weights, best first: safetensors before .bin within a variant; the
    full-precision files before the fp16 variant unless loading in float16; the UNet's raw (non-EMA)
    copy only when asked for."""
    stems = ("model", "pytorch_model") if component == "text_encoder" else ("diffusion_pytorch_model",) * 2
    if raw_unet and component == "unet":
        variants = [".non_ema"]
    else:
        variants = [".fp16", ""] if prefer_fp16 else ["", ".fp16"]
    return [f"{stem}{variant}{ext}" for variant in variants for stem, ext in zip(stems, (".safetensors", ".bin"))]


def first_weights_file(component: str, exists: Callable[[str], bool], name: str, *, prefer_fp16: bool,
                       raw_unet: bool) -> str:
    """"component/file" of the first candidate weights file that exists (a folder's or a hub repo's)."""
    names = weight_file_candidates(component, prefer_fp16=prefer_fp16, raw_unet=raw_unet)
    found = next((f"{component}/{n}" for n in names if exists(f"{component}/{n}")), None)
    if found is None:
        raise CheckpointError(f"{name}: no weights in {component}/ (looked for {', '.join(names)})")
    return found


def _component_tensors(folder: Path, component: str, name: str, *, prefer_fp16: bool, raw_unet: bool = False,
                       device=None) -> dict:
    file = first_weights_file(component, lambda rel: (folder / rel).is_file(), name, prefer_fp16=prefer_fp16,
                              raw_unet=raw_unet)
    return read_tensors(folder / file, device)[0]


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
        channel_mult=tuple(width_ratio(w, widths[0], what) for w in widths),
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
        channel_mult=tuple(width_ratio(w, widths[0], what) for w in widths),
        num_res_blocks=cfg.get("layers_per_block", 1),
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
