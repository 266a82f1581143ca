"""The schedule tables and the step equations against diffusers' DDIMScheduler / DDPMScheduler."""
import math

import pytest
import torch

from efddpm.method import scheduler as S

SD1_DIFFUSERS = S.diffusers_config()


@pytest.fixture(scope="module")
def diffusers():
    """The reference, for the tests that need it (the others run without it)."""
    return pytest.importorskip("diffusers")


def ddim(diffusers, num_steps=None):
    s = diffusers.DDIMScheduler(**SD1_DIFFUSERS)
    if num_steps:
        s.set_timesteps(num_steps)
    return s


def test_training_tables_equal_diffusers(diffusers):
    ref = ddim(diffusers)
    abar = S.alphas_cumprod()
    assert abar.dtype == torch.float32
    assert (S.betas() - ref.betas).abs().max() <= 1e-7
    assert (abar - ref.alphas_cumprod).abs().max() <= 1e-7
    assert abs(S.final_alpha_cumprod(abar) - float(ref.final_alpha_cumprod)) <= 1e-7
    assert abs(S.final_alpha_cumprod(abar) - 0.99915) < 1e-6           # prev below t = 0 is abar_0, not 1
    # float64 tables agree with the float32 ones to float32 precision
    assert (S.alphas_cumprod(dtype=torch.float64) - abar.double()).abs().max() <= 1e-6
    lin = diffusers.DDPMScheduler(beta_schedule="linear")              # 1e-4 .. 0.02, the toy's
    cfg = S.ScheduleConfig(kind="linear", beta_start=1e-4, beta_end=0.02)
    assert (S.alphas_cumprod(cfg) - lin.alphas_cumprod).abs().max() <= 1e-7


@pytest.mark.parametrize("num_steps", [10, 50, 100, 250])
def test_grid_and_posterior_variance_equal_ddim(num_steps, diffusers):
    ref = ddim(diffusers, num_steps)
    abar = S.alphas_cumprod()
    ts = S.timesteps(num_steps)
    assert torch.equal(ts, ref.timesteps)
    for t in ts.tolist():
        prev = t - 1000 // num_steps
        assert S.previous_timestep(t, num_steps) == prev
        s = S.step_coefficients(abar, t, num_steps, eta=1.0)
        assert abs(s.var - float(ref._get_variance(t, prev))) <= 1e-7
        assert abs(s.abar_prev - (float(ref.alphas_cumprod[prev]) if prev >= 0
                                  else float(ref.final_alpha_cumprod))) <= 1e-7


def test_grid_sd1_100_steps():
    ts = S.timesteps(100)
    assert ts[0] == 991 and ts[-1] == 1 and ts[1] == 981 and len(ts) == 100
    abar = S.alphas_cumprod()
    last = S.step_coefficients(abar, 1, 100)
    assert last.t_prev == -9 and last.abar_prev == S.final_alpha_cumprod(abar)
    assert 0.020 < last.sigma < 0.021                                      # sigma_1 ~ 0.0206 (docs/numerics.md)


def test_posterior_variance_equals_ddpm(diffusers):
    """DDPMScheduler's posterior variance: stride 1 over the whole table, and on the strided grid
    for every step whose prev >= 0 (its last step uses abar_prev = 1 where SD1.x uses abar_0)."""
    abar = S.alphas_cumprod()
    ref = diffusers.DDPMScheduler(**{k: v for k, v in SD1_DIFFUSERS.items() if k != "set_alpha_to_one"})
    betas64 = S.betas(dtype=torch.float64)
    abar64 = S.alphas_cumprod(dtype=torch.float64)
    for t in range(1, 1000):
        v = S.variance(float(abar[t]), float(abar[t - 1]))
        assert abs(v - float(ref._get_variance(t))) <= 1e-7
        # the paper's stride-1 form beta_t (1 - abar_{t-1}) / (1 - abar_t)
        paper = float(betas64[t] * (1 - abar64[t - 1]) / (1 - abar64[t]))
        assert abs(S.variance(float(abar64[t]), float(abar64[t - 1])) - paper) <= 1e-12
    ref.set_timesteps(100)
    assert torch.equal(ref.timesteps, S.timesteps(100))
    for t in S.timesteps(100).tolist()[:-1]:
        s = S.step_coefficients(abar, t, 100)
        assert abs(s.var - float(ref._get_variance(t))) <= 1e-7


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_step_equals_ddim_step(eta, diffusers):
    """eq. 3-4 against DDIMScheduler.step (which uses the paper's sigma_t^2 inside D)."""
    n = 50
    ref = ddim(diffusers, n)
    abar = S.alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    for t in S.timesteps(n).tolist()[::7] + [1]:
        x, eps, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        s = S.step_coefficients(abar, t, n, eta=eta)
        ours = S.ddpm_step(x, eps, s, z)
        theirs = ref.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        assert (ours - theirs).abs().max() <= 2e-6 * max(1.0, float(theirs.abs().max()))
        # and its predicted x_0 is P
        p = ref.step(eps, t, x, eta=eta, variance_noise=z).pred_original_sample
        assert (S.predicted_x0(x, eps, s.abar_t) - p).abs().max() <= 2e-6 * float(p.abs().max())
        # the reference's D (eta * var) agrees with the paper's only at eta in {0, 1}
        r = S.step_coefficients(abar, t, n, eta=eta, reference_direction=True)
        assert (abs(r.dir_coef - s.dir_coef) < 1e-12) == (eta in (0.0, 1.0))


def test_marginal_is_forward_chain_composed():
    """eq. 1 applied step by step (and over strides) has the marginal of eq. 2."""
    abar = S.alphas_cumprod(dtype=torch.float64)
    betas = S.betas(dtype=torch.float64)
    x0 = torch.full((20000,), 0.7, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = x0.clone()
    for t in range(1000):
        x = S.forward_chain_step(x, float(betas[t]), torch.randn(x.shape, generator=g, dtype=x.dtype))
        if t in (0, 99, 499, 999):
            mean_err = abs(float(x.mean()) - 0.7 * math.sqrt(float(abar[t])))
            assert mean_err < 4 * math.sqrt((1 - float(abar[t])) / x.numel()) + 1e-12
            assert abs(float(x.var()) / (1 - float(abar[t])) - 1) < 0.05
    # noiseless: the signal coefficient of the chain over strides is sqrt(abar_t) exactly
    x, a_s = torch.ones(1, dtype=torch.float64), 1.0
    for t in reversed(S.timesteps(100).tolist()):
        x = S.forward_chain_step(x, 1 - float(abar[t]) / a_s, torch.zeros(1, dtype=torch.float64))
        a_s = float(abar[t])
        assert abs(float(x) - math.sqrt(float(abar[t]))) < 1e-12
    eps = torch.randn(5, generator=g, dtype=torch.float64)
    assert torch.allclose(S.marginal(x0[:5], 0.3, eps), math.sqrt(0.3) * x0[:5] + math.sqrt(0.7) * eps)


def test_check_alphas_cumprod(diffusers):
    S.check_alphas_cumprod(diffusers.DDIMScheduler(**SD1_DIFFUSERS).alphas_cumprod)   # passes
    S.check_alphas_cumprod(S.alphas_cumprod(dtype=torch.float64))
    with pytest.raises(ValueError, match="differs"):
        S.check_alphas_cumprod(S.alphas_cumprod(S.ScheduleConfig(kind="linear", beta_start=1e-4,
                                                                 beta_end=0.02)))
    bad = S.alphas_cumprod().clone()
    bad[500] += 1e-4
    with pytest.raises(ValueError, match="t=500"):
        S.check_alphas_cumprod(bad)
    with pytest.raises(ValueError, match="entries"):
        S.check_alphas_cumprod(S.alphas_cumprod()[:999])
