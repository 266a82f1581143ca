"""The overlap of an edit's inversion with its regeneration (efddpm.app.overlap), its logic on the CPU: the same bits as
inverting, then regenerating; the regeneration starts before the inversion ends; no step reads a noise map before
the chunk that writes it has run. (On a GPU, tests/test_cuda.py checks the bits with real streams and
benchmarks/speed.py the time.)"""
from functools import partial

import pytest
import torch

from efddpm.app.fast import extract_noise_batched
from efddpm.app.overlap import PendingNoise
from efddpm.method.inversion import edit_friendly_inversion, regenerate
from efddpm.nets.unet import UNet

from models_util import FAST_PATH_UNET, randomize_

STEPS, SKIP, CHUNK = 30, 6, 4


@pytest.fixture(scope="module")
def setup():
    unet = randomize_(UNet(FAST_PATH_UNET).eval(), 0)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8, generator=gen)
    cond, uncond, target = (torch.randn(1, 77, 16, generator=gen) for _ in range(3))
    return unet, x0, cond, uncond, target


def network(unet, log=None):
    """The UNet as a noise predictor; log: gets ("inversion" | "regeneration", timesteps) per call (a regeneration
    call holds one timestep, an inversion call a chunk of them)."""
    def f(x, t, c):
        if log is not None:
            log.append(("regeneration" if len(set(t.tolist())) == 1 and x.shape[0] == 2 else "inversion", t.tolist()))
        with torch.no_grad():
            return unet(x, t, c)
    return f


def invert(f, setup, extract):
    unet, x0, cond, uncond, _ = setup
    return edit_friendly_inversion(f, x0, cond, uncond, 3.5, num_steps=STEPS, skip=SKIP, extract=extract,
                                   generator=torch.Generator().manual_seed(1))


def overlapped(setup, log=None, wait=True):
    """Invert with the extraction deferred, regenerate pulling it (wait False: a regeneration that never asks)."""
    unet, _, _, uncond, target = setup
    pending = PendingNoise(stream=None)
    code = invert(network(unet, log), setup, partial(pending.extract, chunk=CHUNK))
    run = partial(regenerate, network(unet, log), code, target, uncond, 15.0, skip=SKIP)
    if not wait:
        out = run()
        pending.finish()
        return out, code
    return pending.regenerating(run), code


def test_the_same_bits_as_inverting_then_regenerating(setup):
    unet, _, _, uncond, target = setup
    code = invert(network(unet), setup, partial(extract_noise_batched, chunk=CHUNK))
    expected = regenerate(network(unet), code, target, uncond, 15.0, skip=SKIP)
    out, pending_code = overlapped(setup)
    assert torch.equal(out, expected)
    used = STEPS - SKIP                                              # the noisier z's are never computed (NaN)
    assert torch.equal(pending_code.zs[:used], code.zs[:used]) and torch.equal(pending_code.xts, code.xts)
    pending_code.check()                                             # a whole code once finished


def test_the_regeneration_starts_before_the_inversion_ends(setup):
    log = []
    overlapped(setup, log)
    kinds = [kind for kind, _ in log]
    inversion_calls = kinds.count("inversion")
    assert inversion_calls == -(-(STEPS - SKIP) // CHUNK)            # the chunks, each once
    first_step, last_chunk = kinds.index("regeneration"), len(kinds) - 1 - kinds[::-1].index("inversion")
    assert first_step < last_chunk
    assert kinds.count("regeneration") == STEPS - SKIP
    # pulled lazily, one chunk ahead: a chunk is computed only once the regeneration is within a chunk of needing it
    # (so that on a GPU the side stream has the next chunk queued, and the host never runs the whole inversion first)
    steps_before = [kinds[:i].count("regeneration") for i, kind in enumerate(kinds) if kind == "inversion"]
    assert steps_before == [max(1, 1 + CHUNK * (k - 1)) if k else 1 for k in range(len(steps_before))]


def test_no_step_reads_a_noise_map_before_it_is_written(setup):
    """Without the wait the regeneration reads z's still NaN: the output is NaN. With it, every z it read was
    finite when read."""
    out, _ = overlapped(setup, wait=False)
    assert torch.isnan(out).all()
    unet, _, _, uncond, target = setup
    pending = PendingNoise(stream=None)
    code = invert(network(unet), setup, partial(pending.extract, chunk=CHUNK))
    read = []

    def noise_ready(t):
        pending.wait(t)
        read.append(bool(torch.isfinite(code.zs[t - 1]).all()))
    regenerate(network(unet), code, target, uncond, 15.0, skip=SKIP, noise_ready=noise_ready)
    assert read == [True] * (STEPS - SKIP)
