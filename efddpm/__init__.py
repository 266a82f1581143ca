"""efddpm: the edit-friendly DDPM noise space (Huberman-Spiegelglas et al., CVPR 2024) on SD1.x, in plain PyTorch."""
from efddpm.core.version import VERSION as __version__

from efddpm.checkpoint import CheckpointError, StableDiffusionModels, load, save_single_file
from efddpm.nets.clip import CLIPTextConfig, CLIPTextModel
from efddpm.app.editor import Editor
from efddpm.method.latent_code import LatentCode
from efddpm.method.p2p import P2P
from efddpm.method.inversion import (ddim_inversion, edit, edit_friendly_inversion, native_inversion,
                        regenerate)
from efddpm.method.scheduler import SD1, ScheduleConfig
from efddpm.nets.tokenizer import CLIPTokenizer
from efddpm.nets.unet import UNet, UNetConfig
from efddpm.nets.vae import AutoencoderKL, VAEConfig
