"""Reading tensor files: .safetensors, and torch.save files (.ckpt/.pt/.pth/.bin) through torch.load
with weights_only=True, which never runs code from the file. Lightning-era .ckpt files pickle a few
training-state objects next to the weights: exactly those are unpickled into inert stand-ins.

For the CPU a file is memory-mapped: a tensor is read from disk when first used, and never when not. For a CUDA
device a .safetensors file is read straight to the GPU (read_safetensors_to): its data in large sequential reads
through two pinned buffers, each copied asynchronously while the next is read, into one device buffer that the
tensors view; no copy of the weights is made in host memory, and the dtype is cast on the GPU by the loader."""
import json
import math
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


def read_tensors(path: Path, device: torch.device | None = None) -> tuple[dict, dict]:
    """({name: tensor}, safetensors metadata) of a .safetensors file or a torch file (.ckpt/.pt/.pth/.bin): on the
    CPU (memory-mapped), or a .safetensors file's on a CUDA `device` (read_safetensors_to)."""
    if path.suffix == ".safetensors" and device is not None and torch.device(device).type == "cuda":
        return read_safetensors_to(path, torch.device(device))
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


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
STAGING_BYTES = 64 * 2**20   # one read: large enough for full-speed sequential reads, two of them pinned


def read_safetensors_to(path: Path, device: torch.device) -> tuple[dict, dict]:
    """({name: tensor on device}, metadata) of a .safetensors file (format: an 8-byte little-endian header size, a
    JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data).
    The tensors view one device buffer holding the file's data (a tensor whose offset its dtype cannot view gets a
    copy); the caller keeps what it needs and drops the rest."""
    def bad(message: str):
        return CheckpointError(f"{path}: unreadable .safetensors file (truncated or corrupted?): {message}")
    try:
        with open(path, "rb", buffering=0) as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= min(path.stat().st_size - 8, 100 * 2**20):
                raise bad(f"header size {size}")
            try:
                header = json.loads(f.read(size))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise bad(f"header is not JSON ({e})") from None
            metadata = header.pop("__metadata__", None) or {}
            entries = _entries(header, bad)
            data = max((end for _, _, _, end in entries.values()), default=0)
            if 8 + size + data > path.stat().st_size:
                raise bad(f"the header promises {data} bytes of data, the file has {path.stat().st_size - 8 - size}")
            buffer = _read_to(f, data, device, bad)
    except OSError as e:
        raise bad(str(e)) from None
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        raw = buffer[begin:end]
        if begin % dtype.itemsize:                       # an offset its dtype cannot view: a copy of its own
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(shape)
    return tensors, metadata


def _entries(header: dict, bad) -> dict:
    """{name: (dtype, shape, begin, end)} of a safetensors header, every entry checked."""
    entries = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], list(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} is not a tensor of a known dtype ({str(entry)[:80]})") from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
                and all(isinstance(n, int) and n >= 0 for n in shape)
                and end - begin == math.prod(shape) * dtype.itemsize):
            raise bad(f"entry {name!r}: offsets {[begin, end]} do not hold {entry['dtype']} {shape}")
        entries[name] = (dtype, shape, begin, end)
    return entries


def _read_to(f, nbytes: int, device: torch.device, bad) -> torch.Tensor:
    """The next nbytes of the open file f in a uint8 tensor on device: for CUDA, read into two pinned buffers in
    turn, each copied to the device asynchronously while the other is read (elsewhere: read in place)."""
    out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    if device.type != "cuda":
        _read_exactly(f, out, bad)
        return out
    staging = [torch.empty(min(STAGING_BYTES, nbytes), dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    copied = [None, None]                                # the event after each buffer's last copy
    for i, start in enumerate(range(0, nbytes, STAGING_BYTES)):
        n, k = min(STAGING_BYTES, nbytes - start), i % 2
        if copied[k] is not None:
            copied[k].synchronize()                      # its previous copy has left the buffer
        _read_exactly(f, staging[k][:n], bad)
        out[start:start + n].copy_(staging[k][:n], non_blocking=True)
        copied[k] = torch.cuda.Event()
        copied[k].record()
    torch.cuda.current_stream().synchronize()            # the buffers may go
    return out


def _read_exactly(f, out: torch.Tensor, bad) -> None:
    """Fill the uint8 CPU tensor `out` from f (a read may return less than asked)."""
    view, done = memoryview(out.numpy()), 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise bad("the file ends early")
        done += n
