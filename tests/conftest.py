"""Fixtures shared by the tests: a small random model, a picture, a small random CLIP (the eval extra)."""
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from efddpm import AutoencoderKL, CLIPTextModel, UNet, save_single_file

from models_util import CLI_CLIP, CLI_VAE, METHOD_UNET, randomize_


def import_torchvision():
    """torchvision, or None where it is not installed. The wheel for torch's CPU build (torchvision 0.28.0 with
    torch 2.13.0+cpu) stops in `import torchvision`: registering fake kernels for its C ops fails with "operator
    torchvision::nms does not exist". Its model code is pure python, so only then the registrations are replaced
    by an empty module and the import retried."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::" not in str(e) or "does not exist" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]                           # what the failed import left half-done
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    return importlib.import_module("torchvision")


TORCHVISION = import_torchvision()     # here, before any test imports torchmetrics: torchmetrics imports torchvision
                                       # when it is installed, and would fail with the broken wheel's error


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


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    """A small random-weight CLIPModel with its processor, saved as a hub folder (the SD vocabulary)."""
    transformers = pytest.importorskip("transformers")
    from models_util import write_tokenizer_folder
    folder = write_tokenizer_folder(tmp_path_factory.mktemp("clip"))
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = transformers.CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **tower),
                                     vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16)
    torch.manual_seed(3)                              # a seed whose scores are 0 (clamped) for some pairs, not all
    transformers.CLIPModel(config).save_pretrained(folder)
    transformers.CLIPProcessor(image_processor=transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder)).save_pretrained(folder)
    return folder
