"""efddpm.checkpoint.tensors.read_safetensors_to, the reader that puts a .safetensors file's tensors straight onto a
GPU, checked on the CPU (the same parsing and offsets; CUDA adds the pinned buffers): the tensors equal safetensors'
own reader bit for bit, for every dtype, an offset its dtype cannot view, and a file larger than one staging buffer;
a damaged file is refused with one line. (tests/test_cuda.py reads a file to the GPU.)"""
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from efddpm.checkpoint import CheckpointError
from efddpm.checkpoint import tensors as tensor_files
from efddpm.checkpoint.tensors import SAFETENSORS_DTYPES, read_safetensors_to

CPU = torch.device("cpu")


def reference(path):
    with safe_open(path, framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def bytes_of(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def test_every_dtype_equals_safetensors_reader(tmp_path, monkeypatch):
    monkeypatch.setattr(tensor_files, "STAGING_BYTES", 1000)          # many reads, none aligned to a tensor
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t_{name}": (torch.randn(7, 13, generator=gen) * 50).to(dtype)
               for name, dtype in SAFETENSORS_DTYPES.items()}
    tensors["empty"], tensors["scalar"] = torch.zeros(0, 4), torch.tensor(3.5)
    path = tmp_path / "all.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "x": "y"})
    ours, metadata = read_safetensors_to(path, CPU)
    theirs, their_metadata = reference(path)
    assert metadata == their_metadata and ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape
        assert bytes_of(ours[k]) == bytes_of(theirs[k])                    # bit for bit


def handmade(path, entries: dict[str, tuple[str, list[int], bytes]], header_extra: dict | None = None) -> None:
    """A .safetensors file with the tensors' bytes in the given order, no alignment padding."""
    header, data = dict(header_extra or {}), b""
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_an_offset_its_dtype_cannot_view_is_copied(tmp_path):
    """A one-byte tensor first puts the float32 one at an odd offset (safetensors' writer never does; others may)."""
    value = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    path = tmp_path / "odd.safetensors"
    handmade(path, {"b": ("U8", [1], b"\x07"), "f": ("F32", [2, 3], value.numpy().tobytes())})
    ours, _ = read_safetensors_to(path, CPU)
    assert torch.equal(ours["f"], value) and ours["b"].tolist() == [7]
    assert torch.equal(reference(path)[0]["f"], value)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-5], "the header promises 24 bytes of data"),
    (lambda raw: struct.pack("<Q", 10**12) + raw[8:], "header size"),
    (lambda raw: raw[:8] + b"}" + raw[9:], "header is not JSON"),
    (lambda raw: raw.replace(b'"F32"', b'"F99"'), "not a tensor of a known dtype"),
    (lambda raw: raw.replace(b"[0, 24]", b"[0, 20]"), "offsets [0, 20] do not hold F32 [2, 3]"),
])
def test_a_damaged_file_is_refused_in_one_line(tmp_path, damage, message):
    path = tmp_path / "w.safetensors"
    handmade(path, {"w": ("F32", [2, 3], bytes(24))})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match="unreadable .safetensors file") as e:
        read_safetensors_to(path, CPU)
    assert message in str(e.value) and "\n" not in str(e.value)
