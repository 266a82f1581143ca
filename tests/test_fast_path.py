"""The fast path's logic on the CPU: batched inversion over timesteps (efddpm.app.fast.extract_noise_batched)
equals the literal Algorithm 1 (efddpm.method.inversion.extract_noise),
and the steps an edit never uses are never computed. (Its speed is measured by benchmarks/speed.py on a GPU.)

Tolerances: float64 1e-10 (rounding only), float32 1e-5 relative (batch composition changes summation order).
"""
from functools import partial

import pytest
import torch

from efddpm.app.fast import extract_noise_batched
from efddpm.method.inversion import edit, edit_friendly_inversion, extract_noise, native_inversion, regenerate
from efddpm.method.scheduler import timesteps
from efddpm.nets.unet import UNet

from models_util import FAST_PATH_UNET, randomize_

STEPS = 40


def batched(chunk: int):
    """The fast path's extraction with `chunk` steps per call (chunk 1: the literal Algorithm 1 instead)."""
    return extract_noise if chunk == 1 else partial(extract_noise_batched, chunk=chunk)


@pytest.fixture(scope="module")
def setup():
    unet = randomize_(UNet(FAST_PATH_UNET).double().eval(), 0)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)
    cond, uncond = torch.randn(1, 77, 16, generator=gen), torch.randn(1, 77, 16, generator=gen)
    return unet, x0, cond.double(), uncond.double()


def network(unet, dtype, calls=None):
    net = unet.to(dtype)   # in place: the module fixture's UNet is in `dtype` from here on

    def f(x, t, c):
        if calls is not None:
            calls.append(t.tolist())
        with torch.no_grad():
            return net(x.to(dtype), t, c.to(dtype))
    return f


@pytest.mark.parametrize("dtype, tol, recon_tol", [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-5, 1e-4)])
@pytest.mark.parametrize("invert", [edit_friendly_inversion, native_inversion])
def test_batched_inversion_equals_step_by_step(setup, dtype, tol, recon_tol, invert):
    """In float32 the batched code reconstructs to 1.2e-5 here (measured), not to Algorithm 1's ~1e-8: f sees
    x_t before the write-back, so each step's rounding is not cancelled. Hence efddpm.app.fast batches only
    half-precision inversions, and float32 keeps chunk = 1 and the exact reconstruction."""
    unet, x0, cond, uncond = setup
    codes = [invert(network(unet, dtype), x0.to(dtype), cond.to(dtype), uncond.to(dtype), 3.5, num_steps=STEPS,
                    generator=torch.Generator().manual_seed(1), extract=batched(chunk)) for chunk in (1, 7)]
    a, b = codes[0].zs, codes[1].zs
    assert ((a - b).norm() / a.norm()).item() <= tol
    out = regenerate(network(unet, dtype), codes[1], cond.to(dtype), uncond.to(dtype))  # guidance on
    assert (out - x0.to(dtype)).abs().max().item() <= recon_tol


def test_skipped_steps_are_never_computed(setup):
    unet, x0, cond, uncond = setup
    skip, calls = 14, []
    code = edit_friendly_inversion(network(unet, torch.float64, calls), x0, cond, uncond, 3.5, num_steps=STEPS,
                                   generator=torch.Generator().manual_seed(1), skip=skip, extract=batched(5))
    ts = timesteps(STEPS)
    seen = sorted({t for call in calls for t in call}, reverse=True)
    assert seen == ts[skip:].tolist()                                # only the timesteps the edit uses
    assert sum(len(call) for call in calls) == 2 * (STEPS - skip)    # each once, guided: [uncond; cond]
    assert torch.isnan(code.zs[STEPS - skip:]).all() and not torch.isnan(code.zs[: STEPS - skip]).any()
    with pytest.raises(ValueError, match="inverted for edits with skip >= 14"):
        regenerate(network(unet, torch.float64), code, cond, uncond, skip=skip - 1)


def test_skipping_inversion_gives_the_same_edit(setup):
    """An edit with skip k from a code inverted with skip k equals the edit from the full code."""
    unet, x0, cond, uncond = setup
    target = cond.flip(1)
    outs = []
    for inversion_skip, chunk in ((0, 1), (14, 9)):
        code = edit_friendly_inversion(network(unet, torch.float64), x0, cond, uncond, 3.5, num_steps=STEPS,
                                       generator=torch.Generator().manual_seed(2), skip=inversion_skip,
                                       extract=batched(chunk))
        outs.append(edit(network(unet, torch.float64), code, target, uncond, 15.0, skip=14))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-10


def test_the_library_warm_up_runs_beside_the_caller_and_raises_its_error_on_join():
    """Editor.from_pretrained's LibraryWarmUp: the ops run in their own thread, and a failure there is not lost."""
    from efddpm.app.fast import LibraryWarmUp
    warm_up = LibraryWarmUp(torch.device("cpu"), torch.float32)
    assert warm_up.name == "efddpm-library-warm-up"
    warm_up.join()
    assert not warm_up.is_alive() and warm_up.error is None
    with pytest.raises(RuntimeError):                   # no integer convolution: the thread's error, raised here
        LibraryWarmUp(torch.device("cpu"), torch.int64).join()
