"""Fixtures shared by the command-line and bad-input tests: a small random model and a picture."""
from pathlib import Path

import pytest
from PIL import Image

from efddpm import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet, VAEConfig, save_single_file

from inversion_util import SMALL
from models_util import randomize_


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """A small SD1.x-layout model (random weights) for 32x32 pictures, as one official-layout file."""
    path = tmp_path_factory.mktemp("model") / "tiny-sd.safetensors"
    unet = UNet(SMALL)
    vae = AutoencoderKL(VAEConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8))
    text = CLIPTextModel(CLIPTextConfig(width=32, layers=1, heads=2, mlp_width=64))
    save_single_file(path, *(randomize_(m, seed) for seed, m in enumerate((unet, vae, text))), image_size=32)
    return path


@pytest.fixture(scope="session")
def picture(tmp_path_factory) -> Path:
    """48x40, a red square on white."""
    path = tmp_path_factory.mktemp("pictures") / "red.png"
    img = Image.new("RGB", (48, 40), (255, 255, 255))
    img.paste((220, 30, 30), (10, 8, 30, 28))
    img.save(path)
    return path
