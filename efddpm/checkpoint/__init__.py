"""Load Stable Diffusion 1.x weights into efddpm's models, and save them as one file.

    load(source) -> StableDiffusionModels(unet, vae, text_encoder, tokenizer, alphas_cumprod, scheduler_config, source)

`source` is one of
    a single file in the original CompVis/LDM layout (.safetensors; .ckpt/.pt/.pth only through
        torch.load(weights_only=True)), whose names are our module names under fixed prefixes;
    a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), renamed
        by the rules of diffusers_unet_name / diffusers_vae_name / transformers_clip_name, configs taken
        from each config.json;
    a Hugging Face hub repo id ("stable-diffusion-v1-5/stable-diffusion-v1-5") in the diffusers layout,
        through the huggingface_hub cache (revision, offline mode).

Every tensor of every model is filled exactly once from the source, shape checked; anything missing,
unexpected or mis-shaped raises CheckpointError naming the keys. Models are built on the meta device,
so nothing is ever initialised at random.

One file per job, each importing only the ones above it:
    common       CheckpointError, Weights (what a source holds), helpers shared by all
    names        the renaming rules, diffusers / transformers names -> ours
    tensors      reading .safetensors and torch files (never unpickling arbitrary objects)
    single_file  the original single-file layout: prefixes, EMA copy, configs from shapes or metadata
    diffusers    diffusers folders: weights files, configs from config.json
    hub          hub repo ids -> a folder of the huggingface_hub cache
    models       load(), save_single_file(), building and filling the models
"""
from efddpm.checkpoint.common import SD1_IMAGE_SIZE, CheckpointError
from efddpm.checkpoint.diffusers import (clip_config_from_transformers, unet_config_from_diffusers,
                                         vae_config_from_diffusers, weight_file_candidates)
from efddpm.checkpoint.hub import HUB_CONFIG_FILES
from efddpm.checkpoint.models import StableDiffusionModels, check_state_dict, load, save_single_file
from efddpm.checkpoint.names import conv_1x1, diffusers_unet_name, diffusers_vae_name, transformers_clip_name
from efddpm.checkpoint.single_file import (EMA_PREFIX, SCHEDULE_BUFFERS, TEXT_PREFIX, TEXT_PREFIX_SHORT, UNET_PREFIX,
                                           VAE_PREFIX, ema_weights, infer_clip_config, infer_unet_config,
                                           infer_vae_config)
from efddpm.checkpoint.tensors import LIGHTNING_GLOBALS, read_tensors
