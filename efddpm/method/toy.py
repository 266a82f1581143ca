"""The 2-D toy of the paper's Fig. 3: native vs edit-friendly inversion with an ideal model.

Data x_0 ~ N(m, I) with m = (10, 10), prior N(0, I). For Gaussian data the ideal noise predictor is
closed-form: with x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, x_t ~ N(sqrt(abar_t) m, I) and

    f_t(x) = E[eps | x_t = x] = sqrt(1 - abar_t) (x - sqrt(abar_t) m).

The schedule is the linear DDPM one (beta 1e-4 .. 0.02 over 1000 steps) with the SD1.x grid rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from efddpm.method.inversion import edit_friendly_inversion, native_inversion
from efddpm.method.latent_code import LatentCode
from efddpm.method.noise_stats import noise_statistics
from efddpm.method.scheduler import ScheduleConfig, alphas_cumprod

TOY_SCHEDULE = ScheduleConfig(kind="linear", beta_start=1e-4, beta_end=0.02)
TOY_MEAN = (10.0, 10.0)


def gaussian_noise_predictor(*, mean=TOY_MEAN, schedule: ScheduleConfig = TOY_SCHEDULE,
                             dtype: torch.dtype = torch.float64):
    """The ideal f(x [B, ...], t [B], cond) for data N(mean, I), in any shape: `mean` broadcasts against one sample
    (the toy's (10, 10) for [B, 2]; a number for latents [B, C, h, w]). cond, if given, is a per-row mean that
    broadcasts against x ([B, 2], [B, 1, 1, 1], ...: a "prompt" for guidance tests); None means `mean`. Pointwise
    in x, so exactly shift-equivariant."""
    abar = alphas_cumprod(schedule).to(dtype)
    m0 = torch.as_tensor(mean, dtype=dtype)

    def f(x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        a = abar.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))  # [B, 1, ...]
        m = (m0 if cond is None else cond).to(x.device, x.dtype)                  # broadcasts to [B, ...]
        return (1 - a).sqrt() * (x - a.sqrt() * m)                                # [B, ...]
    return f


@dataclass
class ToyResult:
    x0: Tensor                  # [B, 2]
    native: LatentCode          # xts [N+1, B, 2], zs [N, B, 2]
    edit_friendly: LatentCode
    stats: dict                 # noise_statistics of both

    def as_dict(self) -> dict:
        """Plain data: trajectories and noise vectors of both inversions (numpy arrays)."""
        out = {"x0": self.x0.numpy(), "timesteps": self.native.timesteps.numpy()}
        for name, code in (("native", self.native), ("edit_friendly", self.edit_friendly)):
            out[f"{name}_xts"] = code.xts.numpy()
            out[f"{name}_zs"] = code.zs.numpy()
        return out


def run_toy(num_points: int = 1, num_steps: int = 100, seed: int = 0,
            dtype: torch.dtype = torch.float64) -> ToyResult:
    """Draw num_points data points and invert them both ways with the ideal model."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.as_tensor(TOY_MEAN, dtype=dtype) + torch.randn(num_points, 2, generator=g, dtype=dtype)
    f = gaussian_noise_predictor(dtype=dtype)
    kw = dict(num_steps=num_steps, schedule=TOY_SCHEDULE, guidance=None, generator=g)
    native = native_inversion(f, x0, **kw)
    ef = edit_friendly_inversion(f, x0, **kw)
    return ToyResult(x0, native, ef,
                     {"native": noise_statistics(native), "edit_friendly": noise_statistics(ef)})


# ---------------------------------------------------------------------------------------------
# Plot (Pillow only): top, the trajectories x_T -> x_0; bottom, the noise vectors z_t.
# ---------------------------------------------------------------------------------------------

def plot_toy(result: ToyResult, path: str, point: int = 0, size: int = 360) -> None:
    """Write a 2x2 PNG: trajectory and noise vectors z_t of the native and the edit-friendly
    inversion of data point `point`. Colour runs from t = T (blue) to t = 1 (red)."""
    from PIL import Image, ImageDraw

    pad, title_h = 30, 22
    img = Image.new("RGB", (2 * size, 2 * (size + title_h)), "white")
    draw = ImageDraw.Draw(img)
    codes = (("native", result.native), ("edit-friendly", result.edit_friendly))
    stats = (result.stats["native"], result.stats["edit_friendly"])                  # in the order of codes

    def colour(i, n):
        u = i / max(n - 1, 1)
        return (int(255 * u), 40, int(255 * (1 - u)))

    def panel(col, row, title, pts_list, lim, arrows_from_origin):
        ox, oy = col * size, row * (size + title_h)
        draw.text((ox + 8, oy + 4), title, fill="black")
        oy += title_h
        (x_lo, x_hi), (y_lo, y_hi) = lim

        def px(p):
            u = (float(p[0]) - x_lo) / (x_hi - x_lo)
            v = (float(p[1]) - y_lo) / (y_hi - y_lo)
            return ox + pad + u * (size - 2 * pad), oy + size - pad - v * (size - 2 * pad)

        draw.rectangle([ox + pad, oy + pad, ox + size - pad, oy + size - pad], outline="gray")
        for xv in (x_lo, x_hi):
            draw.text((px((xv, y_lo))[0] - 8, oy + size - pad + 4), f"{xv:.3g}", fill="gray")
        for yv in (y_lo, y_hi):
            draw.text((ox + 2, px((x_lo, yv))[1] - 6), f"{yv:.3g}", fill="gray")
        if arrows_from_origin:            # unit circle: the scale of standard normal noise
            c0, c1 = px((-1, 1)), px((1, -1))
            draw.ellipse([c0[0], c0[1], c1[0], c1[1]], outline="black")
        n = len(pts_list)
        for i, p in enumerate(pts_list):
            q = px(p)
            if arrows_from_origin:
                draw.line([px((0, 0)), q], fill=colour(i, n), width=1)
            elif i + 1 < n:
                draw.line([q, px(pts_list[i + 1])], fill=colour(i, n), width=1)
            draw.ellipse([q[0] - 2, q[1] - 2, q[0] + 2, q[1] + 2], fill=colour(i, n))
        if not arrows_from_origin:        # name the ends of the trajectory
            for i, label in ((0, "x_T"), (n - 1, "x_0")):
                q = px(pts_list[i])
                box = draw.textbbox((q[0] + 4, q[1] - 14), label)
                draw.rectangle(box, fill="white")
                draw.text((q[0] + 4, q[1] - 14), label, fill="black")

    trajs = [c.xts[:, point].flip(0).double() for _, c in codes]           # x_T .. x_0, [N+1, 2]
    noises = [c.zs[:, point].flip(0).double() for _, c in codes]           # z_T .. z_1, [N, 2]
    allp = torch.cat(trajs)
    lo, hi = allp.min(0).values - 0.5, allp.max(0).values + 0.5
    traj_lim = ((float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1])))
    r = max(1.5, float(torch.cat(noises).abs().max()) * 1.05)
    noise_lim = ((-r, r), (-r, r))
    for col, ((name, code), tr, nz, st) in enumerate(zip(codes, trajs, noises, stats)):
        panel(col, 0, f"{name}: x_T -> x_0", tr.tolist(), traj_lim, False)
        panel(col, 1, f"{name}: z_t (var {st['mean_variance']:.3g}, "
                      f"corr {st['mean_correlation']:+.2f})", nz.tolist(), noise_lim, True)
    img.save(path)
