"""efddpm: the edit-friendly DDPM noise space (Huberman-Spiegelglas et al., CVPR 2024) on SD1.x, in plain PyTorch."""
from .clip import CLIPTextConfig, CLIPTextModel
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig
