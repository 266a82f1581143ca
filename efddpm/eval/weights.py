"""A metric network's weight file as a state dict: .safetensors, or a torch.save file read with weights_only=True
(never running code from the file), in either of torch's formats: torchvision's ImageNet checkpoints and LPIPS'
heads predate torch's zip format, which efddpm.checkpoint.tensors (for SD1.x) requires."""
from __future__ import annotations

from pathlib import Path

import torch


def read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)
