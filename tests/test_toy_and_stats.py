"""The 2-D toy (paper Fig. 3) and the noise statistics (paper Fig. 4)."""

import torch

from efddpm import inversion as I
from efddpm import noise_stats as N
from efddpm.scheduler import alphas_cumprod, marginal
from efddpm.toy import TOY_MEAN, TOY_SCHEDULE, gaussian_noise_predictor, plot_toy, run_toy

from inversion_util import one_thread  # noqa: F401  (autouse fixture)
from inversion_util import latent, prompts, unet_predictor


def test_statistics_on_known_noise():
    g = torch.Generator().manual_seed(0)
    iid = torch.randn(40, 1, 4, 16, 16, generator=g, dtype=torch.float64)
    assert (N.variance(iid) - 1).abs().max() < 0.15
    assert N.correlation(iid).abs().max() < 0.12
    # z_n = a_n - a_{n-1} with iid a: variance 2, correlation of neighbours -1/2
    a = torch.randn(41, 1, 4, 16, 16, generator=g, dtype=torch.float64)
    diff = a[1:] - a[:-1]
    assert (N.variance(diff) / 2 - 1).abs().max() < 0.15
    assert (N.correlation(diff) + 0.5).abs().max() < 0.1


def test_toy_predictor_is_the_mmse_one():
    """f_t(x) = sqrt(1 - abar) (x - sqrt(abar) m) is E[eps | x_t]: its error is the minimum,
    abar_t per coordinate, and scaling it either way is worse."""
    f = gaussian_noise_predictor()
    abar = alphas_cumprod(TOY_SCHEDULE).double()
    g = torch.Generator().manual_seed(0)
    for t in (50, 400, 900):
        x0 = torch.tensor(TOY_MEAN, dtype=torch.float64) + torch.randn(50000, 2, generator=g, dtype=torch.float64)
        eps = torch.randn(50000, 2, generator=g, dtype=torch.float64)
        xt = marginal(x0, float(abar[t]), eps)
        pred = f(xt, torch.full((50000,), t), None)
        mse = float(((pred - eps) ** 2).mean())
        assert abs(mse / float(abar[t]) - 1) < 0.03
        for c in (0.9, 1.1):
            assert float(((c * pred - eps) ** 2).mean()) > mse


def test_toy_statistics_and_plot(tmp_path):
    res = run_toy(num_points=200, num_steps=100, seed=0)
    assert float((I.regenerate(gaussian_noise_predictor(), res.edit_friendly) - res.x0).abs().max()) <= 1e-10
    nat, ef = res.stats["native"], res.stats["edit_friendly"]
    print(f"\ntoy: variance median native {float(nat['variance'].median()):.2f}, edit-friendly "
          f"{float(ef['variance'].median()):.2f}; mean correlation native {nat['mean_correlation']:+.3f}, "
          f"edit-friendly {ef['mean_correlation']:+.3f}")
    assert 0.8 < float(nat["variance"].median()) < 1.25
    assert float(ef["variance"].median()) > 5
    assert (ef["variance"] > nat["variance"]).float().mean() > 0.9
    assert abs(nat["mean_correlation"]) < 0.05
    assert ef["mean_correlation"] < -0.3
    data = res.as_dict()
    assert data["native_xts"].shape == (101, 200, 2) and data["edit_friendly_zs"].shape == (100, 200, 2)
    path = tmp_path / "toy.png"
    plot_toy(run_toy(num_points=1), path)
    from PIL import Image
    img = Image.open(path)
    assert img.size[0] > 300 and len(img.convert("L").histogram()) - img.convert("L").histogram().count(0) > 10


def test_small_unet_statistics():
    """On a small random UNet: edit-friendly maps have variance far above the native ones (~1)
    and consecutive correlation ~ -0.5 (native ~ 0)."""
    f = unet_predictor(torch.float32)
    uncond, conds = prompts(torch.float32)
    x0 = latent(torch.float32, size=16)
    stats = {}
    for name, method in (("native", I.native_inversion), ("edit_friendly", I.edit_friendly_inversion)):
        code = method(f, x0, conds[:1], uncond, 3.5, num_steps=50,
                      generator=torch.Generator().manual_seed(0))
        stats[name] = N.noise_statistics(code)
    nat, ef = stats["native"], stats["edit_friendly"]
    print(f"\nsmall UNet: variance median native {float(nat['variance'].median()):.2f}, edit-friendly "
          f"{float(ef['variance'].median()):.2f}; mean correlation native {nat['mean_correlation']:+.3f}, "
          f"edit-friendly {ef['mean_correlation']:+.3f}")
    assert 0.8 < float(nat["variance"].median()) < 1.5
    assert float(ef["variance"].median()) > 5
    assert abs(nat["mean_correlation"]) < 0.1
    assert ef["mean_correlation"] < -0.3
    assert nat["t"][0] == 1 and len(nat["t"]) == 50 and len(nat["correlation"]) == 49
