"""efddpm: the edit-friendly DDPM noise space (Huberman-Spiegelglas et al., CVPR 2024) on SD1.x, in plain PyTorch."""
__version__ = "0.1.0"

from .checkpoint import CheckpointError, StableDiffusionModels, load, save_single_file
from .clip import CLIPTextConfig, CLIPTextModel
from .pipeline import Editor
from .inversion import (LatentCode, ddim_inversion, edit, edit_friendly_inversion, native_inversion,
                        regenerate)
from .scheduler import SD1, ScheduleConfig
from .tokenizer import CLIPTokenizer
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig
