"""CUDA-only checks of the full-size SD1.x networks: fp16/bf16 against fp32, and inductor compile; and
Prompt-to-Prompt on the fast path (CUDA graphs, batched inversion, channels_last) with the embedded model.

Skipped where there is no GPU (CI); run on a GPU with `pytest tests/test_cuda.py`.
Tolerances: half precision vs fp32 relative L2 error <= 1e-2 (fp16) / 5e-2 (bf16: 8-bit mantissa; the
512px VAE round trip, ~30 convolutions deep, measured 3.5e-2 on an H100 with torch 2.11);
compiled vs eager in the same dtype <= 1e-2 (inductor reorders reductions).
"""
import pytest
import torch

from efddpm.app.editor import Editor
from efddpm.app.embedded import DEFAULT_MODEL
from efddpm.method.p2p import P2P
from efddpm.miniature import world
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


def p2p_edits(editor: Editor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """A held-out picture's colour edit (100 steps, skip 36, the model's guidance) from a code inverted with the given
    draws: plain, with P2P() and with P2P(xa=0, sa=0); images [1, 3, 64, 64] in [-1, 1] on the CPU."""
    picture = world.heldout_pictures(1)[0]
    code = editor.invert(world.render(picture), picture.caption, noise=noise.to(editor.device))
    target = world.edit_targets(picture)[0].caption
    return {name: editor.edit(code, target, output="tensor", skip=36, **({} if p2p is None else {"p2p": p2p})).cpu()
            for name, p2p in (("plain", None), ("p2p", P2P()), ("off", P2P(xa=0.0, sa=0.0)))}


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"{DEFAULT_MODEL} not present")
def test_prompt_to_prompt_on_the_fast_path():
    """While a controller is attached the fast path's UNet runs eagerly (no graph replay) and computes the maps the
    controller asks for: with xa = sa = 0 the edit is the plain (graph-replayed) edit, P2P() changes it, and the P2P
    edit equals the CPU's from the same draws. Float32 (the fast path keeps TF32 off)."""
    noise = torch.randn(100, 1, 4, 16, 16, generator=torch.Generator().manual_seed(0))    # eq. 6's draws, shared
    fast = Editor.from_pretrained(str(DEFAULT_MODEL), device="cuda")
    assert fast.fast
    gpu, cpu = p2p_edits(fast, noise), p2p_edits(Editor.from_pretrained(str(DEFAULT_MODEL)), noise)
    off, p2p_gain, cross = ((gpu["off"] - gpu["plain"]).abs().max().item(), (gpu["p2p"] - gpu["plain"]).abs().max().item(),
                            (gpu["p2p"] - cpu["p2p"]).abs().max().item())
    print(f"max abs image difference: xa=sa=0 vs plain {off:.2e}; P2P vs plain {p2p_gain:.2f}; P2P CUDA vs CPU {cross:.2e}")
    assert off <= 1e-3
    assert p2p_gain >= 0.1
    assert cross <= 1e-2


def edit_jobs(n: int, guidance: float):
    """Colour edits of n held-out pictures, a seed each (efddpm.app.batched jobs)."""
    from efddpm.app.batched import Job
    return [Job(world.render(p), p.caption, [world.edit_targets(p)[0].caption], [guidance], 10 + i)
            for i, p in enumerate(world.heldout_pictures(n, seed=5))]


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"{DEFAULT_MODEL} not present")
def test_batched_engine_on_the_fast_path():
    """fp16 on the fast path (half-precision inversion batched over timesteps, CUDA graphs): one job per batch is
    the sequential edit bit for bit; eight jobs in one batch within 8/255 of it (fp16 sums in another order at
    another batch size; a row paired with another job's noise is tens of levels away)."""
    import numpy as np
    from efddpm.app.batched import Settings, edit_batch
    editor = Editor.from_pretrained(str(DEFAULT_MODEL), device="cuda", dtype=torch.float16)
    jobs, settings = edit_jobs(8, editor.target_guidance), Settings(100, 3.5, 1.0, 36)
    alone = []
    for job in jobs:
        code = editor.invert(job.image, job.source, steps=100, guidance=3.5, seed=job.seed, skip=36)
        sequential = np.asarray(editor.edit(code, job.targets, guidance=job.guidances, skip=36)[0])
        (one,) = edit_batch(editor, [job], settings)
        assert np.array_equal(np.asarray(one.images[0]), sequential) and one.inversion == code.settings
        alone.append(sequential.astype(int))
    together = edit_batch(editor, jobs, settings)
    worst = max(np.abs(np.asarray(r.images[0]) - a).max() for r, a in zip(together, alone))
    print(f"K = 8 vs sequential, fp16: max pixel difference {worst}")
    assert worst <= 8
    assert np.abs(alone[0] - alone[1]).max() > 40


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"{DEFAULT_MODEL} not present")
def test_prompt_to_prompt_with_a_compiled_unet():
    """Editor.compile()'d UNet: the P2P edit (its regeneration runs the original UNet eagerly while the controller is
    set, efddpm.app.fast.GraphedUNet; the inversion runs compiled) equals the eager one within 1e-2 (inductor
    reorders reductions), and the plain edit too."""
    noise = torch.randn(100, 1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    eager = Editor.from_pretrained(str(DEFAULT_MODEL), device="cuda")
    reference = p2p_edits(eager, noise)
    torch._dynamo.reset()
    unet = eager.compile().models.unet                  # efddpm.app.fast.compiled, as `--compile` does
    assert eager.compile().models.unet is unet          # a second call compiles nothing more
    compiled = p2p_edits(eager, noise)
    errors = {name: (compiled[name] - reference[name]).abs().max().item() for name in reference}
    print(f"compiled vs eager, max abs image difference: {errors}")
    assert max(errors.values()) <= 1e-2
    assert (compiled["p2p"] - compiled["plain"]).abs().max() >= 0.1


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"{DEFAULT_MODEL} not present")
def test_overlapped_edit_is_the_sequential_edit_bit_for_bit_and_never_waits_for_the_gpu():
    """Editor.invert_and_edit on the fast path (fp16: the inversion batched 16 timesteps a call on a side stream, the
    regeneration graph-replayed on the current one) gives the bytes of invert then edit. And the loops queue their
    work without one host synchronisation (torch's sync debug mode set to raise): the method-level calls it runs."""
    from functools import partial
    from efddpm.app.overlap import PendingNoise
    from efddpm.method.inversion import edit_friendly_inversion, regenerate
    editor = Editor.from_pretrained(str(DEFAULT_MODEL), device="cuda", dtype=torch.float16)
    picture = world.heldout_pictures(1, seed=5)[0]
    image, source, target = world.render(picture), picture.caption, world.edit_targets(picture)[0].caption
    code = editor.invert(image, source, steps=100, guidance=3.5, seed=3, skip=36)
    sequential = editor.edit(code, target, guidance=7.5, skip=36, output="tensor")
    overlapped, pending_code = editor.invert_and_edit(image, source, target, steps=100, source_guidance=3.5,
                                                      guidance=7.5, skip=36, seed=3, output="tensor")
    assert code.settings["chunk"] == 16 and torch.equal(overlapped, sequential)
    assert torch.equal(pending_code.zs[:64], code.zs[:64]) and torch.equal(pending_code.xts, code.xts)

    x0, _ = editor.encode_image(image)
    cond, uncond, tgt = editor.encode_prompts(source), editor.encode_prompts(""), editor.encode_prompts(target)
    f_batched, f_graphed = editor.noise_predictor(), editor.noise_predictor(graphed=True)

    def overlapped_latents():
        pending = PendingNoise(torch.cuda.Stream())
        generator = torch.Generator("cuda").manual_seed(3)
        c = edit_friendly_inversion(f_batched, x0, cond, uncond, 3.5, num_steps=100, skip=36, generator=generator,
                                    extract=partial(pending.extract, chunk=16))
        out = regenerate(f_graphed, c, tgt, uncond, 7.5, skip=36, noise_ready=pending.wait)
        pending.finish()
        return out
    expected = overlapped_latents()                          # warm: graphs captured, kernels chosen
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        latents = overlapped_latents()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(latents, expected)
    assert torch.equal(editor.decode(latents), sequential)


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"{DEFAULT_MODEL} not present")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_a_single_file_read_straight_to_the_gpu_holds_the_cpu_readers_weights(dtype):
    """load(device="cuda") reads a .safetensors file through pinned buffers into GPU memory and casts there; the
    weights equal the CPU reader's cast on the CPU, bit for bit (the embedded model's fp16 file; IEEE rounding is the
    same on both)."""
    from efddpm.checkpoint import load
    gpu, cpu = load(DEFAULT_MODEL, device="cuda", dtype=dtype), load(DEFAULT_MODEL, dtype=dtype)
    for a, b in ((gpu.unet, cpu.unet), (gpu.vae, cpu.vae), (gpu.text_encoder, cpu.text_encoder)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert x.is_cuda and x.dtype == y.dtype and torch.equal(x.cpu(), y), name
            assert x.untyped_storage().nbytes() == x.nbytes, name      # its own memory, not the file's buffer
