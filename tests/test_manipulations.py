"""Image shifting, colour manipulation and SDEdit."""
import torch

from efddpm.method import inversion as I
from efddpm.method import manipulations as M
from efddpm.method.scheduler import SD1
from efddpm.method.toy import gaussian_noise_predictor

from inversion_util import one_thread  # noqa: F401  (autouse fixture)
from inversion_util import latent, prompts, unet_predictor


def test_shift_and_interior():
    x = torch.arange(2 * 5 * 6, dtype=torch.float64).reshape(1, 2, 5, 6)
    y = M.shift(x, 1, -2)
    assert torch.equal(y[..., 1:, :4], x[..., :4, 2:])                       # content moved by (1, -2)
    assert torch.equal(M.interior(y, 1, -2), x[..., :4, 2:])                 # the wrapped band is cut
    assert torch.equal(torch.sort(y.flatten()).values, torch.sort(x.flatten()).values)  # a permutation
    assert M.shift_error(y, x, 1, -2) == 0.0


def test_shifted_code_of_equivariant_model_is_shifted_image():
    """With an exactly shift-equivariant predictor (pointwise) both codes shift the output
    exactly: checks shift_code moves x_T, every z_t and the trajectory consistently."""
    f = gaussian_noise_predictor(mean=0.0, schedule=SD1)   # N(0, I) data: pointwise
    x0 = latent(size=12)
    for method in (I.edit_friendly_inversion, I.native_inversion):
        code = method(f, x0, guidance=None, num_steps=50, generator=torch.Generator().manual_seed(0))
        shifted = M.shift_code(code, 2, -3)
        assert shifted.settings["shift"] == [2, -3]
        for skip in (0, 18):
            out = I.regenerate(f, shifted, skip=skip)
            assert float((out - M.shift(x0, 2, -3)).abs().max()) <= 1e-10


def denoiser_like_unet(lam: float = 0.3):
    """A small "model" that denoises: the ideal predictor of N(0, I) data plus lam times a random
    small UNet, which brings what a real network has and a pointwise one lacks: zero padding,
    strided down-sampling, attention, so shifting is not exactly equivariant."""
    ideal, unet = gaussian_noise_predictor(mean=0.0, schedule=SD1), unet_predictor(torch.float32)

    def f(x, t, cond):
        return ideal(x, t) + lam * unet(x, t, cond)
    return f


def test_shifting_edit_friendly_code_changes_output_less_than_native():
    """Metric: relative L2 error, on the interior (without the wrapped band), between the output
    of the shifted code and the shifted input: ||G(shift(code)) - shift(x0)|| / ||shift(x0)||.

    At this scale the gap is modest (edit-friendly ~0.7-0.85 of native, see the report); the
    paper's "completely different image" for native maps is a property of a trained SD model."""
    f = denoiser_like_unet()
    uncond, conds = prompts(torch.float32)
    x0 = latent(torch.float32, size=16)
    ratios = []
    for seed in range(2):
        errs = {}
        for name, method in (("edit_friendly", I.edit_friendly_inversion), ("native", I.native_inversion)):
            code = method(f, x0, conds[:1], uncond, 3.5, num_steps=50,
                          generator=torch.Generator().manual_seed(seed))
            errs[name] = [M.shift_error(I.regenerate(f, M.shift_code(code, dy, dx), conds[:1], uncond),
                                        x0, dy, dx) for dy, dx in ((1, 2), (4, 4))]
        print(f"\nshift error (1,2) and (4,4), seed {seed}: edit-friendly "
              f"{errs['edit_friendly'][0]:.3f}, {errs['edit_friendly'][1]:.3f}; native "
              f"{errs['native'][0]:.3f}, {errs['native'][1]:.3f}")
        for ef, nat in zip(errs["edit_friendly"], errs["native"]):
            assert ef < 0.95 * nat
            assert ef < 0.5                                                  # still the shifted image
            ratios.append(ef / nat)
    assert sum(ratios) / len(ratios) < 0.9


def _region_errors(y, x0, mask, target):
    inside = float(((y - target) * mask).norm() / ((x0 - target) * mask).norm())  # 1: untouched, 0: = M
    outside = float(((y - x0) * (1 - mask)).norm() / (x0 * (1 - mask)).norm())    # 0: untouched
    return inside, outside


def test_colour_manipulation_vs_sdedit():
    f = unet_predictor()
    uncond, conds = prompts()
    x0 = latent(size=16)
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    mask[..., 4:10, 5:12] = 1
    target = torch.tensor([1.5, -1.0, 0.5, 1.0], dtype=torch.float64).view(1, 4, 1, 1).expand(1, 4, 16, 16)
    code = I.edit_friendly_inversion(f, x0, conds[:1], uncond, 3.5, num_steps=50,
                                     generator=torch.Generator().manual_seed(0))
    # strength 0, or a step range the replay never reaches, is the plain reconstruction
    for s, rng in ((0.0, (1, 20)), (0.2, (45, 50))):
        y = M.colour_edit(f, code, mask, target, s, rng, conds[:1], uncond, skip=10)
        assert float((y - x0).abs().max()) <= 1e-10
    y = M.colour_edit(f, code, mask, target, 0.2, (1, 20), conds[:1], uncond)
    inside, outside = _region_errors(y, x0, mask, target)
    sd = M.sdedit(f, M.paste(x0, mask, target), 10, conds[:1], uncond, 3.5, num_steps=50,
                  generator=torch.Generator().manual_seed(1))
    sd_inside, sd_outside = _region_errors(sd, x0, mask, target)
    print(f"\ncolour (s=0.2, t in [1, 20]): inside {inside:.2f}, outside {outside:.2f}; "
          f"SDEdit from t=10: inside {sd_inside:.2f}, outside {sd_outside:.2f}")
    assert inside < 0.7                          # the masked region moved towards the colour
    assert sd_inside < 0.7                       # so did SDEdit's
    assert outside < 0.5 * sd_outside            # but the colour edit kept the rest of the image
    again = M.sdedit(f, M.paste(x0, mask, target), 10, conds[:1], uncond, 3.5, num_steps=50,
                     generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, sd)


def test_colour_target_and_latent_mask():
    def encode(img):                              # a stand-in VAE: 8x average pool to 4 channels
        return torch.nn.functional.avg_pool2d(img, 8).repeat(1, 2, 1, 1)[:, :4] * 0.18215
    img = torch.zeros(1, 3, 32, 32)
    mask = torch.zeros(32, 32)
    mask[8:20, 3:5] = 1
    m = M.latent_mask(mask, (4, 4))
    assert m.shape == (1, 1, 4, 4) and m.sum() == 2 * 1 and m[0, 0, 1, 0] == 1 and m[0, 0, 2, 0] == 1
    flat = M.colour_target(encode, (1.0, 0.0, 0.5), (32, 32))
    assert flat.shape == (1, 4, 4, 4)
    assert torch.allclose(flat[0, :3, 0, 0], torch.tensor([1.0, -1.0, 0.0]) * 0.18215)
    painted = M.colour_target(encode, (1.0, 0.0, 0.5), (32, 32), image=img, mask=mask)
    assert painted[0, 0, 1, 0] > 0 and painted[0, 0, 0, 0] == 0 and painted[0, 0, 3, 3] == 0  # only in the mask
