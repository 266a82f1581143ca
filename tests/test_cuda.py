"""CUDA-only checks of the full-size SD1.x networks: fp16/bf16 against fp32, and inductor compile.

Skipped where there is no GPU (CI); run on a GPU with `pytest tests/test_cuda.py`.
Tolerances: half precision vs fp32 relative L2 error <= 1e-2 (fp16) / 5e-2 (bf16: 8-bit mantissa; the
512px VAE round trip, ~30 convolutions deep, measured 3.5e-2 on an H100 with torch 2.11);
compiled vs eager in the same dtype <= 1e-2 (inductor reorders reductions).
"""
import pytest
import torch

from efddpm.nets.clip import CLIPTextModel
from efddpm.nets.unet import UNet
from efddpm.nets.vae import AutoencoderKL

from models_util import randomize_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HALF_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def sd1():
    """Full SD1.x networks with random weights, fp32 on the GPU, and their inputs (512x512 image)."""
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        unet, vae, clip = UNet(), AutoencoderKL(), CLIPTextModel()
    models = {name: randomize_(m, seed).cuda().eval() for seed, (name, m) in
              enumerate({"unet": unet, "vae": vae, "clip": clip}.items())}
    inputs = {
        "unet": (torch.randn(2, 4, 64, 64, generator=gen), torch.tensor([981, 1]), torch.randn(2, 77, 768, generator=gen)),
        "vae": (torch.rand(1, 3, 512, 512, generator=gen) * 2 - 1,),
        "clip": (torch.randint(0, 49408, (2, 77), generator=gen),),
    }
    return models, {k: tuple(a.cuda() for a in v) for k, v in inputs.items()}


def as_function(name, model):
    """The network as one function of its inputs (the VAE: encode to the posterior mode, then decode)."""
    return (lambda image: model.decode(model.encode(image).mode())) if name == "vae" else model


def run(function, args, dtype):
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    with torch.inference_mode():
        return function(*args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["unet", "vae", "clip"])
def test_half_precision_close_to_fp32(sd1, name, dtype):
    models, inputs = sd1
    reference = run(as_function(name, models[name]), inputs[name], torch.float32)
    half = run(as_function(name, models[name].to(dtype)), inputs[name], dtype)
    models[name].float()
    assert half.dtype == dtype and torch.isfinite(half).all()
    print(f"{name} {dtype}: relative error vs fp32 {rel_err(half, reference):.2e}")
    assert rel_err(half, reference) <= HALF_TOL[dtype]


@pytest.mark.parametrize("name", ["unet", "vae", "clip"])
def test_inductor_fullgraph_compile_matches_eager(sd1, name):
    models, inputs = sd1
    model = models[name].half()
    torch._dynamo.reset()
    eager = run(as_function(name, model), inputs[name], torch.float16)
    compiled = run(torch.compile(as_function(name, model), fullgraph=True), inputs[name], torch.float16)
    model.float()
    print(f"{name} compiled fp16: relative error vs eager {rel_err(compiled, eager):.2e}")
    assert rel_err(compiled, eager) <= 1e-2
