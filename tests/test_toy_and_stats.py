"""The 2-D toy (paper Fig. 3) and the noise statistics (paper Fig. 4)."""

import numpy as np
import torch
from PIL import Image

from efddpm.method import inversion as I
from efddpm.method import noise_stats as N
from efddpm.method.scheduler import alphas_cumprod, marginal
from efddpm.method.toy import TOY_MEAN, TOY_SCHEDULE, gaussian_noise_predictor, plot_toy, run_toy

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


def test_toy_statistics():
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


def test_toy_plot_draws_the_noise_vectors_where_they_are(tmp_path):
    """The bottom panels of plot_toy draw each z_t as a dot, in its own colour (t = T blue .. t = 1 red),
    at the end of an arrow from the panel's centre, both panels at one scale (axis limits +-r). Read back
    from the PNG: the farthest pixel of each z_t's colour lies |z_t| from the centre (plus the dot's 2 px
    radius), and the edit-friendly cloud is several times wider than the native one, as their noise is."""
    res = run_toy(num_points=1)
    path = tmp_path / "toy.png"
    plot_toy(res, path)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)           # [H, W, 3]
    h, w = img.shape[:2]
    codes = (res.native, res.edit_friendly)
    zs = [c.zs.flip(0)[:, 0].double() for c in codes]                        # z_T .. z_1, [N, 2]: the drawing order
    r = max(1.5, 1.05 * max(float(z.norm(dim=1).max()) for z in zs))       # the panels' axis limit
    rms = []
    for col, z in enumerate(zs):
        panel = img[h // 2:, col * w // 2:(col + 1) * w // 2]                 # bottom row: the noise vectors
        ys, xs = np.nonzero((panel == 128).all(axis=-1))                      # the gray frame of the axes
        cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
        unit = (xs.max() - xs.min()) / (2 * r)                                # pixels per unit of z
        radii, errors = [], []
        for i, zi in enumerate(z):
            u = i / (len(z) - 1)
            yy, xx = np.nonzero((panel == (int(255 * u), 40, int(255 * (1 - u)))).all(axis=-1))
            if len(yy):                                                       # later arrows may hide a dot
                radius = (np.hypot(yy - cy, xx - cx).max() - 2) / unit       # less the dot's radius
                radii.append(radius)
                errors.append(radius - float(zi.norm()))
        assert len(radii) >= 70                         # dots seen: native 79, edit-friendly 99 of 100
        errors = np.array(errors)                        # in units of z; 1 unit = 8.4 px here
        assert errors.max() < 0.3                        # no dot beyond its |z_t| (measured 0.18, 0.19)
        assert np.median(np.abs(errors)) < 0.15          # (measured 0.08, 0.06)
        assert np.quantile(np.abs(errors), 0.9) < 0.3    # partly hidden dots read short (measured 0.17, 0.15)
        rms.append(float(np.sqrt(np.mean(np.square(radii)))))
    print(f"\ntoy plot: rms |z_t| read from the PNG: native {rms[0]:.2f}, edit-friendly {rms[1]:.2f}")
    assert rms[0] < 2.2                                 # measured 1.69: 2-D standard normal noise, ~sqrt(2)
    assert rms[1] > 2.5 * rms[0]                        # measured 5.99, 3.5x: per-entry variance 9.1 against 0.58


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
