"""Reading tensor files: .safetensors, and torch.save files (.ckpt/.pt/.pth/.bin) through torch.load
with weights_only=True, which never runs code from the file. Lightning-era .ckpt files pickle a few
training-state objects next to the weights: exactly those are unpickled into inert stand-ins."""
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from efddpm.checkpoint.common import CheckpointError, examples, first_line


TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # pickled torch files (read with weights_only)

# Exactly the globals the official SD v1.x .ckpt files need beyond tensors (numpy.core: numpy 1.x, the
# writer's; numpy._core: the same class pickled by numpy 2). _codecs.encode is allowed by torch itself.
LIGHTNING_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint", "numpy.dtype",
                     "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")


class _Discarded:
    """Inert stand-in for the training-state objects that Lightning-era .ckpt files pickle next to the
    weights (SD v1.x: the ModelCheckpoint class as a key of "callbacks", numpy float64 scores). Building
    one runs no code of theirs; the values are thrown away with everything outside "state_dict"."""

    def __init__(self, *args):
        pass

    def __setstate__(self, state):
        pass


def read_tensors(path: Path) -> tuple[dict, dict]:
    """({name: tensor}, safetensors metadata) of a .safetensors file or a torch file (.ckpt/.pt/.pth/.bin)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable .safetensors file (truncated or corrupted?): {e}") from None
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch_file(path), {}
    raise CheckpointError(f"{path}: unknown file type {path.suffix!r} (expected .safetensors or .ckpt)")


def _read_torch_file(path: Path) -> dict:
    """The tensors of a torch.save zip file, unpickled with weights_only=True (plus the inert stand-ins
    above), taken from "state_dict" when nested there (Lightning checkpoints)."""
    if not zipfile.is_zipfile(path):  # every torch.save since torch 1.6 (2020) writes a zip archive
        raise CheckpointError(f"{path}: not a torch zip archive (truncated or corrupted, or a pre-2020 format)")
    try:
        with torch.serialization.safe_globals([(_Discarded, name) for name in LIGHTNING_GLOBALS]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # the pickle itself is broken
            needed = []
        needed = [g for g in needed if g not in LIGHTNING_GLOBALS]
        if not needed:
            raise CheckpointError(f"{path}: unreadable torch file (corrupted?): {first_line(e)}") from None
        raise CheckpointError(
            f"{path}: unpickling it needs {', '.join(needed)}, and efddpm never unpickles arbitrary objects "
            "(torch.load weights_only=True); convert a file you trust to .safetensors") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable torch file (truncated or corrupted?): {first_line(e)}") from None
    weights = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: holds a {type(weights).__name__}, not a dict of tensors")
    others = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise CheckpointError(f"{path}: {len(others)} entries are not tensors ({examples(others)})")
    return weights
