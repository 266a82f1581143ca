"""Fixtures shared by the command-line and bad-input tests: a small random model and a picture."""
from pathlib import Path

import pytest
from PIL import Image

from efddpm import AutoencoderKL, CLIPTextModel, UNet, save_single_file

from models_util import CLI_CLIP, CLI_VAE, METHOD_UNET, randomize_


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """A small SD1.x-layout model (random weights) for 32x32 pictures, as one official-layout file."""
    path = tmp_path_factory.mktemp("model") / "tiny-sd.safetensors"
    models = UNet(METHOD_UNET), AutoencoderKL(CLI_VAE), CLIPTextModel(CLI_CLIP)
    save_single_file(path, *(randomize_(m, seed) for seed, m in enumerate(models)), image_size=32)
    return path


@pytest.fixture(scope="session")
def picture(tmp_path_factory) -> Path:
    """48x40, a red square on white."""
    path = tmp_path_factory.mktemp("pictures") / "red.png"
    img = Image.new("RGB", (48, 40), (255, 255, 255))
    img.paste((220, 30, 30), (10, 8, 30, 28))
    img.save(path)
    return path
