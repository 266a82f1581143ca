"""Edit-friendly DDPM inversion (the paper's Algorithm 1), the native DDPM and DDIM inversions, and regeneration /
editing. Reads like Secs. 2-3 of the paper: the trajectories x_1..x_T (eq. 1, eq. 6), the noise extraction (eq. 5)
with its write-back, the inversions built from them, then regeneration (eq. 3 replayed) and text-based editing.

The network is any noise predictor f(x [B, ...], t [B], cond) -> eps (efddpm.method.network: guidance, dtype).
The index conventions of the latent code (xts[0] = x_0 ... xts[N] = x_T, zs[n-1] = z_n, skip k starts from
xts[N - k]) are those of the authors' code: efddpm.method.latent_code.

Exact reconstruction. Replaying eq. 3 with the code and the same prompt and guidance returns x_0 up to rounding,
provided inversion and regeneration use the same mu formula, dtype and batch composition (regenerating one code
with one prompt batches [x; x] exactly as the inversion did).

Randomness. Every draw comes from a torch.Generator you pass (recorded as its seed) or from an explicit noise
tensor; with neither, torch's global generator is used. Same seed, device and dtype: bit-identical codes.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from efddpm.method.defaults import ETA, SOURCE_GUIDANCE, STEPS, TARGET_GUIDANCE, default_skip
from efddpm.method.latent_code import LatentCode, code_settings
from efddpm.method.network import NoisePredictor, draw_noise, guided_eps, rows, working_dtype
from efddpm.method.scheduler import (SD1, ScheduleConfig, alphas_cumprod, ddpm_step, forward_chain_step, marginal,
                                     mu, predicted_x0, step_coefficients, timesteps)


# ---------------------------------------------------------------------------------------------
# Sec. 2.1: trajectories x_1..x_T from x_0
# ---------------------------------------------------------------------------------------------

def native_trajectory(x0: Tensor, abar: Tensor, ts: Tensor, noise: Tensor) -> Tensor:
    """x_1..x_T from the forward chain (eq. 1): each x_t builds on x_{t-1}, so the eps_t of
    eq. 2 are correlated. Between grid points eq. 1 is composed over the stride
    (beta = 1 - abar_t / abar_s); x_0 counts as abar = 1. Returns xts [N+1, B, ...]."""
    n_steps = ts.numel()
    xts = torch.empty((n_steps + 1, *x0.shape), dtype=noise.dtype, device=x0.device)
    xts[0] = x0
    abar_s = 1.0
    for n in range(1, n_steps + 1):
        abar_t = float(abar[ts[n_steps - n]])
        xts[n] = forward_chain_step(xts[n - 1], 1.0 - abar_t / abar_s, noise[n - 1])  # eq. 1
        abar_s = abar_t
    return xts


def edit_friendly_trajectory(x0: Tensor, abar: Tensor, ts: Tensor, noise: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps~_t with eps~_t drawn independently for
    every t (eq. 6; never derived from the z's). Returns xts [N+1, B, ...]."""
    n_steps = ts.numel()
    xts = torch.empty((n_steps + 1, *x0.shape), dtype=noise.dtype, device=x0.device)
    xts[0] = x0
    for n in range(1, n_steps + 1):
        xts[n] = marginal(x0, float(abar[ts[n_steps - n]]), noise[n - 1])  # eq. 6
    return xts


TRAJECTORIES = {"edit_friendly": edit_friendly_trajectory, "native": native_trajectory}


def trajectory_noise(num_steps: int, x0: Tensor, dtype: torch.dtype, generator: torch.Generator | None,
                     noise: Tensor | None) -> tuple[Tensor, dict]:
    """The N noise tensors of a trajectory, [N, B, ...] (noise[n-1] goes into xts[n]): `noise` itself, or drawn;
    and what to record of them ({"noise": "explicit" | "generator" | "global", "seed": ...})."""
    if noise is not None:
        if tuple(noise.shape) != (num_steps, *x0.shape):
            raise ValueError(f"noise must have shape {(num_steps, *x0.shape)}, got {tuple(noise.shape)}")
        return noise.to(x0.device, dtype), {"noise": "explicit", "seed": None}
    source = {"noise": "generator" if generator is not None else "global",
              "seed": generator.initial_seed() if generator is not None else None}
    return draw_noise((num_steps, *x0.shape), generator, dtype, x0.device), source


# ---------------------------------------------------------------------------------------------
# Sec. 3: noise extraction (eq. 5) and Algorithm 1
# ---------------------------------------------------------------------------------------------

def extract_noise(f: NoisePredictor, xts: Tensor, ts: Tensor, cond=None, uncond=None, guidance=None, *,
                  eta: float = ETA, schedule: ScheduleConfig = SD1, reference_direction: bool = False,
                  skip: int = 0) -> Tensor:
    """Algorithm 1's loop: for t = T..1, z_t = (x_{t-1} - mu_t(x_t)) / sigma_t (eq. 5), then the write-back
    x_{t-1} = mu_t(x_t) + sigma_t z_t (eq. 3), equal to x_{t-1} up to rounding, so that rounding does not drift.

    Modifies xts [N+1, B, ...] in place (the write-back); returns zs [N, B, ...].
    skip k: the k noisiest steps are not computed (their z are NaN); an edit with skip >= k never uses them, and
    saves k network calls. (efddpm.app.fast.extract_noise_batched evaluates f for several steps per call.)
    """
    abar, n_steps = alphas_cumprod(schedule), ts.numel()
    if not 0 <= skip < n_steps:
        raise ValueError(f"need 0 <= skip < {n_steps}, got skip={skip}")
    zs = torch.full_like(xts[1:], float("nan"))                             # [N, B, ...]
    ts = ts.tolist()                                                        # read once (no device sync per step)
    for n in range(n_steps - skip, 0, -1):                                  # the paper's t = n, T - skip .. 1
        s = step_coefficients(abar, ts[n_steps - n], n_steps, schedule, eta, reference_direction)
        if s.sigma <= 0:
            raise ValueError("sigma_t = 0: eq. 5 needs eta > 0 and var_t > 0")
        eps = guided_eps(f, xts[n], s.t, cond, uncond, guidance)           # f_t(x_t), [B, ...]
        zs[n - 1] = (xts[n - 1] - mu(xts[n], eps, s)) / s.sigma             # eq. 5
        xts[n - 1] = ddpm_step(xts[n], eps, s, zs[n - 1])                   # eq. 3 (write-back)
    return zs


Extract = Callable[..., Tensor]   # extract_noise's signature: (f, xts, ts, cond, uncond, guidance, *, eta, ...)


def invert(method: str, f: NoisePredictor, x0: Tensor, cond=None, uncond=None, guidance=SOURCE_GUIDANCE, *,
           num_steps: int = STEPS, eta: float = ETA, generator: torch.Generator | None = None,
           noise: Tensor | None = None, schedule: ScheduleConfig = SD1, reference_direction: bool = False,
           zero_last_noise: bool = False, skip: int = 0, meta: dict | None = None,
           extract: Extract = extract_noise) -> LatentCode:
    """Draw x_1..x_T by the method's trajectory ("edit_friendly": eq. 6, "native": eq. 1), then extract z_T..z_1
    (eq. 5 with write-back). x0: [B, ...], each row with its own noise; noise: optional eps~ [N, B, ...] (noise[n-1]
    for xts[n]); zero_last_noise / reference_direction: the authors' choices (audit options, docs/numerics.md);
    skip: leave out the steps an edit with that skip never uses; extract: the extraction loop (the CUDA fast path
    passes its batched variant); meta: recorded in the code's settings.
    method "ddim": ddim_inversion, which draws nothing (generator and noise must be None) and computes every step
    (eta, skip, extract and the authors' choices do not apply; its code serves every skip)."""
    if method == "ddim":
        if generator is not None or noise is not None:
            raise ValueError("the DDIM inversion is deterministic: it takes no generator or noise")
        return ddim_inversion(f, x0, cond, uncond, guidance, num_steps=num_steps, schedule=schedule, meta=meta)
    dtype = working_dtype(x0)
    abar, ts = alphas_cumprod(schedule), timesteps(num_steps, schedule)
    eps_tilde, source = trajectory_noise(num_steps, x0, dtype, generator, noise)   # [N, B, ...]
    xts = TRAJECTORIES[method](x0.to(dtype), abar, ts, eps_tilde)                   # [N+1, B, ...]
    zs = extract(f, xts, ts, cond, uncond, guidance, eta=eta, schedule=schedule,
                 reference_direction=reference_direction, skip=skip)
    if zero_last_noise:          # the authors' choice: the last step x_1 -> x_0 is deterministic
        zs[0] = 0
    settings = code_settings(method=method, num_steps=num_steps, eta=eta, guidance=guidance, schedule=schedule,
                             dtype=dtype, reference_direction=reference_direction, zero_last_noise=zero_last_noise,
                             skip=skip, **source, meta=meta)   # skip: edits need skip >= this
    return LatentCode(xts[num_steps], zs, xts, ts, settings)


def edit_friendly_inversion(f: NoisePredictor, x0: Tensor, cond=None, uncond=None, guidance=SOURCE_GUIDANCE,
                            **options) -> LatentCode:
    """Algorithm 1: draw x_1..x_T independently by eq. 6, then extract z_T..z_1 by eq. 5 with write-back.
    Replaying eq. 3 with the code and the same cond/guidance returns x_0 exactly. options: those of invert()."""
    return invert("edit_friendly", f, x0, cond, uncond, guidance, **options)


def native_inversion(f: NoisePredictor, x0: Tensor, cond=None, uncond=None, guidance=SOURCE_GUIDANCE,
                     **options) -> LatentCode:
    """The native DDPM inversion (Sec. 2.1), for comparison: x_1..x_T from the forward chain (eq. 1), then
    z_T..z_1 by eq. 5. Also reconstructs exactly, but does not edit well. options: those of invert()."""
    return invert("native", f, x0, cond, uncond, guidance, **options)


def diverse_inversions(f: NoisePredictor, x0: Tensor, seeds: Sequence[int], cond=None, uncond=None,
                       guidance=SOURCE_GUIDANCE, **options) -> list[LatentCode]:
    """Several edit-friendly inversions of one image, one per seed (for diverse edits)."""
    return [edit_friendly_inversion(f, x0, cond, uncond, guidance,
                                    generator=torch.Generator(x0.device).manual_seed(int(s)), **options)
            for s in seeds]


def ddim_inversion(f: NoisePredictor, x0: Tensor, cond=None, uncond=None, guidance=SOURCE_GUIDANCE, *,
                   num_steps: int = STEPS, schedule: ScheduleConfig = SD1, meta: dict | None = None) -> LatentCode:
    """DDIM inversion, the classic baseline: run the deterministic (eta = 0) step backwards,
    x_t = sqrt(abar_t) P + sqrt(1 - abar_t) f with P predicted from x_{t_prev} (eq. 2 with the
    predicted noise), evaluating f at x_{t_prev} with timestep t (the usual approximation).
    The code's zs are zero and eta = 0; regeneration is exact only if f barely changes with x.
    """
    dtype = working_dtype(x0)
    abar, ts = alphas_cumprod(schedule), timesteps(num_steps, schedule)
    xts = torch.empty((num_steps + 1, *x0.shape), dtype=dtype, device=x0.device)
    xts[0] = x0
    for n in range(1, num_steps + 1):                                      # t = 1 .. T
        s = step_coefficients(abar, int(ts[num_steps - n]), num_steps, schedule, eta=0.0)
        eps = guided_eps(f, xts[n - 1], s.t, cond, uncond, guidance)       # f_t(x_{t_prev})
        xts[n] = marginal(predicted_x0(xts[n - 1], eps, s.abar_prev), s.abar_t, eps)  # eq. 2, 4
    settings = code_settings(method="ddim", num_steps=num_steps, eta=0.0, guidance=guidance, schedule=schedule,
                             dtype=dtype, reference_direction=False, zero_last_noise=False, skip=0, noise=None,
                             seed=None, meta=meta)
    return LatentCode(xts[num_steps], torch.zeros_like(xts[1:]), xts, ts, settings)


# ---------------------------------------------------------------------------------------------
# Sec. 3: regeneration and editing
# ---------------------------------------------------------------------------------------------

NoiseEdit = Callable[[int, Tensor, Tensor], Tensor]   # (n, z_n [K, ...], P(f) [K, ...]) -> z_n
StepCallback = Callable[[int, Tensor], Tensor]        # (n, x_{n-1} [K, ...]) -> x_{n-1}


def regenerate(f: NoisePredictor, code: LatentCode, cond=None, uncond=None, guidance=None, *,
               skip: int = 0, eta: float | None = None, reference_direction: bool | None = None,
               zero_last_noise: bool = False, noise_edit: NoiseEdit | None = None,
               step_callback: StepCallback | None = None, noise_ready: Callable[[int], None] | None = None) -> Tensor:
    """Replay eq. 3 with the code's noise maps: x_{t-1} = mu_t(x_t) + sigma_t z_t.

    cond: [K or 1, ...] target condition(s); guidance: a number or one per target ([K]); None
    means the guidance the code was inverted with. The code (batch B) is broadcast over the K
    targets when B = 1, or paired row by row when B = K. Starts from x_T (skip = 0) or from
    xts[N - skip] (skip > 0; x_T is xts[N] for the codes made here).
    eta / reference_direction: None means the code's. zero_last_noise: use z_1 = 0 (the
    authors' choice; the output then differs from x_0 by sigma_1 z_1). noise_edit(n, z_n, P):
    replaces z_n before it is used, for manipulations (n is the paper's t, from N-skip down to 1).
    step_callback(n, x): replaces x_{n-1} after each step (Prompt-to-Prompt's local blend and step count,
    efddpm.method.p2p). noise_ready(n): called before z_n is first read (efddpm.app.overlap: the inversion that
    writes it may still be running on another CUDA stream). Returns x_0 [K, ...] in the code's dtype.
    """
    st = code.settings
    schedule = code.schedule
    eta = st["eta"] if eta is None else eta
    reference_direction = st.get("reference_direction", False) if reference_direction is None \
        else reference_direction
    guidance = st.get("guidance") if guidance is None else guidance
    abar = alphas_cumprod(schedule)
    n_steps, ts = code.num_steps, code.timesteps.tolist()                  # read once (no device sync per step)
    if not 0 <= skip < n_steps:
        raise ValueError(f"skip must be in 0..{n_steps - 1}, got {skip}")
    if skip < st.get("skip", 0):
        raise ValueError(f"this code was inverted for edits with skip >= {st['skip']} (its noisier "
                         f"noise maps were never computed), got skip={skip}")
    batch = [code.xts.shape[1]] + [c.shape[0] for c in (cond, uncond) if c is not None]
    if guidance is not None and torch.as_tensor(guidance).numel() > 1:
        batch.append(torch.as_tensor(guidance).numel())
    k = max(batch)
    start = code.x_T if skip == 0 else code.xts[n_steps - skip]            # x_t at t = ts[skip]
    x = rows(start.to(code.zs.dtype), k)                                   # [K, ...]
    if isinstance(guidance, (list, tuple)):                                # one weight per target: on x's device once
        guidance = torch.tensor(guidance, dtype=x.dtype, device=x.device)
    for n in range(n_steps - skip, 0, -1):                                 # paper's t = n
        s = step_coefficients(abar, ts[n_steps - n], n_steps, schedule, eta, reference_direction)
        eps = guided_eps(f, x, s.t, cond, uncond, guidance)                # f_t(x_t), [K, ...]
        if noise_ready is not None:
            noise_ready(n)
        z = rows(code.zs[n - 1], k)                                        # z_n, [K, ...]
        if zero_last_noise and n == 1:
            z = torch.zeros_like(z)
        if noise_edit is not None:
            z = noise_edit(n, z, predicted_x0(x, eps, s.abar_t))
        x = ddpm_step(x, eps, s, z)                                        # eq. 3
        if step_callback is not None:
            x = step_callback(n, x)
    return x


def edit(f: NoisePredictor, code: LatentCode, cond=None, uncond=None, guidance=TARGET_GUIDANCE, *,
         skip: int | None = None, **options) -> Tensor:
    """Text-based editing (Sec. 3): regenerate with the target prompt(s) and guidance(s), from T - T_skip.
    Defaults (efddpm.method.defaults): w_tgt = 15, T_skip = 36 of 100 scaled to the code's steps; eta the code's.
    options: those of regenerate()."""
    skip = default_skip(code.num_steps) if skip is None else skip
    return regenerate(f, code, cond, uncond, guidance, skip=skip, **options)
