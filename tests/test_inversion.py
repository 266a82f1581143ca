"""Inversions and regeneration: exact reconstruction, index conventions, guidance batching,
determinism, saving, and parity with a literal transcription of the authors' loop."""
import pytest
import torch

from efddpm.method.defaults import default_skip
from efddpm.method import inversion as I
from efddpm.method.latent_code import LatentCode
from efddpm.method.network import guided_eps
from efddpm.method import scheduler as S
from efddpm.method.toy import TOY_SCHEDULE, gaussian_noise_predictor

from inversion_util import one_thread  # noqa: F401  (autouse fixture)
from inversion_util import latent, prompts, unet_predictor

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


# ---------------------------------------------------------------------------------------------
# Exact reconstruction
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", [I.edit_friendly_inversion, I.native_inversion])
def test_exact_reconstruction_small_unet(dtype, method):
    f = unet_predictor(dtype)
    uncond, conds = prompts(dtype)
    x0 = latent(dtype)
    n = 100 if method is I.edit_friendly_inversion else 50
    code = method(f, x0, conds[:1], uncond, 3.5, num_steps=n, generator=torch.Generator().manual_seed(0))
    assert code.zs.dtype == dtype and code.xts.shape == (n + 1, *x0.shape)
    out = I.regenerate(f, code, conds[:1], uncond, 3.5)                     # guidance on
    err = float((out - x0).abs().max())
    print(f"\n{method.__name__} {dtype}: max |x0 - regenerate| = {err:.3g}")
    assert err <= TOL[dtype]
    # a skipped start (editing's T_skip) lies on the same trajectory: still exact
    out36 = I.regenerate(f, code, conds[:1], uncond, 3.5, skip=default_skip(n))
    assert float((out36 - x0).abs().max()) <= TOL[dtype]
    # and the prompt matters: another prompt gives another image
    other = I.regenerate(f, code, conds[1:2], uncond, 3.5)
    assert float((other - x0).abs().max()) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_reconstruction_toy_with_guidance(dtype):
    """The 2-D toy's closed-form predictor, conditioned on a per-row mean ("prompt")."""
    f = gaussian_noise_predictor(dtype=dtype)
    g = torch.Generator().manual_seed(3)
    x0 = (10 + torch.randn(64, 2, generator=g, dtype=torch.float64)).to(dtype)
    cond = torch.tensor([[10.0, 10.0]], dtype=dtype)
    uncond = torch.zeros(1, 2, dtype=dtype)
    for method in (I.edit_friendly_inversion, I.native_inversion):
        code = method(f, x0, cond, uncond, 3.5, schedule=TOY_SCHEDULE, generator=g)
        out = I.regenerate(f, code, cond, uncond)                             # the code's guidance
        assert float((out - x0).abs().max()) <= TOL[dtype] * 10               # |x0| ~ 10


def test_zero_last_noise_error_is_sigma1_z1():
    """The authors' zs[0] = 0 makes the last step deterministic: the output misses exactly sigma_1 z_1."""
    f = unet_predictor()
    uncond, conds = prompts()
    x0 = latent()
    code = I.edit_friendly_inversion(f, x0, conds[:1], uncond, 3.5, num_steps=50,
                                     generator=torch.Generator().manual_seed(0))
    out = I.regenerate(f, code, conds[:1], uncond, zero_last_noise=True)
    sigma_1 = S.step_coefficients(S.alphas_cumprod(), 1, 50).sigma
    predicted = sigma_1 * code.zs[0]
    assert float((x0 - out - predicted).abs().max()) <= 1e-10
    assert float(predicted.abs().max()) > 1e-3                                # not a trivial match
    # the same when the inversion itself zeroes it (the authors' code)
    zeroed = I.edit_friendly_inversion(f, x0, conds[:1], uncond, 3.5, num_steps=50, zero_last_noise=True,
                                       generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(zeroed.zs[0]) == 0 and zeroed.settings["zero_last_noise"]
    assert float((I.regenerate(f, zeroed, conds[:1], uncond) - out).abs().max()) <= 1e-12


def test_fp16_network_noise_kept_in_float32():
    """A network answering in fp16 still gets eq. 5 (divide by sigma_t ~ 0.02) in float32, and reconstructs."""
    f32 = unet_predictor(torch.float32)

    def f16(x, t, c):
        return f32(x, t, c).half()
    uncond, conds = prompts(torch.float32)
    x0 = latent(torch.float32)
    code = I.edit_friendly_inversion(f16, x0, conds[:1], uncond, 3.5, num_steps=50,
                                     generator=torch.Generator().manual_seed(0))
    assert code.zs.dtype == torch.float32 and code.xts.dtype == torch.float32
    assert float((I.regenerate(f16, code, conds[:1], uncond) - x0).abs().max()) <= 1e-5
    code_half_input = I.edit_friendly_inversion(f16, x0.half(), conds[:1], uncond, 3.5, num_steps=5,
                                                generator=torch.Generator().manual_seed(0))
    assert code_half_input.zs.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Guidance, batching of targets
# ---------------------------------------------------------------------------------------------

def test_guidance_is_one_batched_call():
    calls = []
    f = unet_predictor(calls=calls)
    uncond, conds = prompts()
    x = latent().expand(3, -1, -1, -1)
    w = torch.tensor([1.0, 3.5, 15.0], dtype=torch.float64)
    eps = guided_eps(f, x, 501, conds, uncond, w)
    assert calls == [6]                                                       # one call, [uncond; cond]
    t = torch.full((3,), 501)
    f_u, f_c = f(x, t, uncond.expand(3, -1, -1)), f(x, t, conds)
    assert torch.allclose(eps, f_u + w.view(3, 1, 1, 1) * (f_c - f_u), atol=1e-12)
    calls.clear()
    # no condition (the authors' empty source prompt): no guidance term, a single plain call
    eps_u = guided_eps(f, x, 501, None, uncond, 3.5)
    assert calls == [3] and torch.allclose(eps_u, f_u, atol=1e-12)


def test_several_targets_in_one_batch():
    """K targets with their own guidance in one batch equal K separate edits; the target equal
    to the source (prompt and guidance) reconstructs."""
    f = unet_predictor()
    uncond, conds = prompts()
    x0 = latent()
    code = I.edit_friendly_inversion(f, x0, conds[:1], uncond, 3.5, num_steps=50,
                                     generator=torch.Generator().manual_seed(0))
    w = [3.5, 15.0, 7.5]
    batch = I.edit(f, code, conds, uncond, w, skip=10)
    assert batch.shape == (3, *x0.shape[1:])
    for k in range(3):
        single = I.edit(f, code, conds[k:k + 1], uncond, w[k], skip=10)
        assert float((batch[k:k + 1] - single).abs().max()) <= 1e-10
    assert float((batch[:1] - x0).abs().max()) <= 1e-10
    assert float((batch[1] - batch[2]).abs().max()) > 1e-2


def test_edit_defaults():
    assert default_skip(100) == 36
    f = unet_predictor()
    uncond, conds = prompts()
    code = I.edit_friendly_inversion(f, latent(), conds[:1], uncond, num_steps=25,
                                     generator=torch.Generator().manual_seed(0))
    assert code.settings["guidance"] == 3.5 and code.settings["eta"] == 1.0
    explicit = I.regenerate(f, code, conds[1:2], uncond, 15.0, skip=9)
    assert torch.equal(I.edit(f, code, conds[1:2], uncond), explicit)


# ---------------------------------------------------------------------------------------------
# Randomness, saving
# ---------------------------------------------------------------------------------------------

def test_same_seed_same_bits_different_seeds_diverse_edits():
    f = unet_predictor(torch.float32)
    uncond, conds = prompts(torch.float32)
    x0 = latent(torch.float32)
    a, b, c = I.diverse_inversions(f, x0, [7, 7, 8], conds[:1], uncond, 3.5, num_steps=50)
    for name in ("x_T", "zs", "xts"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.settings["seed"] == 7 and c.settings["seed"] == 8
    ea, eb, ec = (I.edit(f, code, conds[1:2], uncond) for code in (a, b, c))
    assert torch.equal(ea, eb)                                                # same seed: same bits
    rel = float((ea - ec).norm() / ea.norm())
    print(f"\nrelative difference of two edits with seeds 7, 8: {rel:.3f}")
    assert rel > 0.05                                                         # different seeds: diverse
    for code in (a, c):                                                       # and both reconstruct
        assert float((I.regenerate(f, code, conds[:1], uncond) - x0).abs().max()) <= 1e-5
    # explicit noise tensors reproduce a generator's draws
    noise = torch.randn((50, *x0.shape), generator=torch.Generator().manual_seed(7))
    d = I.edit_friendly_inversion(f, x0, conds[:1], uncond, 3.5, num_steps=50, noise=noise)
    assert torch.equal(d.zs, a.zs) and d.settings["noise"] == "explicit"


def test_save_and_load(tmp_path):
    f = unet_predictor(torch.float32)
    uncond, conds = prompts(torch.float32)
    code = I.edit_friendly_inversion(f, latent(torch.float32), conds[:1], uncond, 3.5, num_steps=20,
                                     generator=torch.Generator().manual_seed(0),
                                     meta={"source_prompt": "a cat"})
    path = tmp_path / "code.safetensors"
    code.save(path)
    back = LatentCode.load(path)
    for name in ("x_T", "zs", "xts", "timesteps"):
        assert torch.equal(getattr(back, name), getattr(code, name))
    assert back.settings == code.settings and back.settings["source_prompt"] == "a cat"
    assert back.schedule == S.SD1 and torch.equal(back.to("cpu").zs, code.zs)
    assert torch.equal(I.edit(f, back, conds[1:2], uncond), I.edit(f, code, conds[1:2], uncond))


# ---------------------------------------------------------------------------------------------
# DDIM inversion
# ---------------------------------------------------------------------------------------------

def test_ddim_inversion():
    # exact when f does not depend on x (then inverting the DDIM step is exact)
    def f_const(x, t, c):
        return torch.sin(t.to(x.dtype) / 37).reshape(-1, 1, 1, 1) * torch.ones_like(x)
    x0 = latent()
    code = I.ddim_inversion(f_const, x0, guidance=None, num_steps=50)
    assert code.settings["eta"] == 0.0 and torch.count_nonzero(code.zs) == 0
    assert float((I.regenerate(f_const, code) - x0).abs().max()) <= 1e-10
    # approximate for an x-dependent f (the toy's ideal one), better with more steps
    f = gaussian_noise_predictor()
    x0 = 10 + torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = []
    for n in (10, 100):
        c = I.ddim_inversion(f, x0, guidance=None, num_steps=n, schedule=TOY_SCHEDULE)
        errs.append(float((I.regenerate(f, c) - x0).abs().max()))
    print(f"\nDDIM inversion on the toy, max error 10 / 100 steps: {errs[0]:.3g} / {errs[1]:.3g}")
    assert errs[1] < errs[0] / 3


# ---------------------------------------------------------------------------------------------
# Parity with the authors' code
# ---------------------------------------------------------------------------------------------

def reference_forward(sched, f, x0, uncond, cond, cfg_scale, etas, noise):
    """Literal transcription of the authors' inversion_forward_process (DDPM_inversion,
    ddm_inversion/inversion_utils.py), with model.scheduler -> sched, model.unet -> f, their
    torch.randn_like -> the next tensor of `noise` (same draw order: ascending t)."""
    num_inference_steps = sched.num_inference_steps
    timesteps = sched.timesteps
    alpha_bar = sched.alphas_cumprod
    t_to_idx = {int(v): k for k, v in enumerate(timesteps)}
    draws = iter(noise)
    xts = torch.zeros((num_inference_steps + 1, *x0.shape[1:]), dtype=x0.dtype)   # sample_xts_from_x0
    xts[0] = x0
    for t in reversed(timesteps):
        idx = num_inference_steps - t_to_idx[int(t)]
        xts[idx] = x0 * (alpha_bar[t] ** 0.5) + next(draws) * (1 - alpha_bar[t]) ** 0.5
    zs = torch.zeros((num_inference_steps, *x0.shape[1:]), dtype=x0.dtype)
    etas = [etas] * num_inference_steps
    for t in timesteps:
        idx = num_inference_steps - t_to_idx[int(t)] - 1
        xt = xts[idx + 1][None]
        out = f(xt, t.reshape(1), uncond)
        cond_out = f(xt, t.reshape(1), cond)
        noise_pred = out + cfg_scale * (cond_out - out)
        xtm1 = xts[idx][None]
        pred_original_sample = (xt - (1 - alpha_bar[t]) ** 0.5 * noise_pred) / alpha_bar[t] ** 0.5
        prev_timestep = t - sched.config.num_train_timesteps // sched.num_inference_steps
        alpha_prod_t_prev = sched.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else sched.final_alpha_cumprod
        variance = reference_variance(sched, t)
        pred_sample_direction = (1 - alpha_prod_t_prev - etas[idx] * variance) ** 0.5 * noise_pred
        mu_xt = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
        z = (xtm1 - mu_xt) / (etas[idx] * variance ** 0.5)
        zs[idx] = z
        xtm1 = mu_xt + (etas[idx] * variance ** 0.5) * z
        xts[idx] = xtm1
    zs[0] = torch.zeros_like(zs[0])
    return xt, zs, xts


def reference_variance(sched, timestep):
    prev_timestep = timestep - sched.config.num_train_timesteps // sched.num_inference_steps
    alpha_prod_t = sched.alphas_cumprod[timestep]
    alpha_prod_t_prev = sched.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else sched.final_alpha_cumprod
    return ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)


def reference_reverse(sched, f, xT, uncond, cond, cfg_scale, eta, zs):
    """Literal transcription of the authors' inversion_reverse_process + reverse_step (one prompt)."""
    n = sched.num_inference_steps
    timesteps = sched.timesteps
    xt = xT[None]
    t_to_idx = {int(v): k for k, v in enumerate(timesteps[-zs.shape[0]:])}
    for t in timesteps[-zs.shape[0]:]:
        idx = n - t_to_idx[int(t)] - (n - zs.shape[0] + 1)
        uncond_out = f(xt, t.reshape(1), uncond)
        cond_out = f(xt, t.reshape(1), cond)
        z = zs[idx][None]
        noise_pred = uncond_out + cfg_scale * (cond_out - uncond_out)
        # reverse_step
        prev_timestep = t - sched.config.num_train_timesteps // n
        alpha_prod_t = sched.alphas_cumprod[t]
        alpha_prod_t_prev = sched.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else sched.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample = (xt - beta_prod_t ** 0.5 * noise_pred) / alpha_prod_t ** 0.5
        variance = reference_variance(sched, t)
        pred_sample_direction = (1 - alpha_prod_t_prev - eta * variance) ** 0.5 * noise_pred
        prev_sample = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
        if eta > 0:
            prev_sample = prev_sample + eta * variance ** 0.5 * z
        xt = prev_sample
    return xt


@pytest.mark.parametrize("eta, n", [(1.0, 100), (0.6, 50)])
def test_audit_options_reproduce_the_authors_code(eta, n):
    """Our inversion/editing with reference_direction=True, zero_last_noise=True equals the
    authors' loop (same noise). Tables in float64 on both sides, so only operation order differs."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(**S.diffusers_config())
    sched.set_timesteps(n)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    f = unet_predictor()
    uncond, conds = prompts()
    x0 = latent()
    noise = torch.randn((n, *x0.shape), generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    _, zs_ref, xts_ref = reference_forward(sched, f, x0, uncond, conds[:1], 3.5, eta, noise[:, 0])
    code = I.edit_friendly_inversion(f, x0, conds[:1], uncond, 3.5, num_steps=n, eta=eta, noise=noise,
                                     reference_direction=True, zero_last_noise=True)
    scale = float(zs_ref.abs().max())
    assert float((code.zs[:, 0] - zs_ref).abs().max()) <= 1e-10 * scale
    assert float((code.xts[:, 0] - xts_ref).abs().max()) <= 1e-10
    for skip in (0, default_skip(n)):
        ref = reference_reverse(sched, f, xts_ref[n - skip], uncond, conds[1:2], 15.0, eta,
                                zs_ref[:n - skip])
        ours = I.edit(f, code, conds[1:2], uncond, 15.0, skip=skip)           # audit options from code
        assert float((ours - ref).abs().max()) <= 1e-9
    # the paper's D differs from the authors' at eta != 1, and the defaults give exact reconstruction
    paper = I.edit_friendly_inversion(f, x0, conds[:1], uncond, 3.5, num_steps=n, eta=eta, noise=noise)
    differs = float((paper.zs - code.zs)[1:].abs().max()) > 1e-6
    assert differs == (eta != 1.0)
    assert float((I.regenerate(f, paper, conds[:1], uncond) - x0).abs().max()) <= 1e-10
