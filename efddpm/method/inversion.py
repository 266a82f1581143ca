"""Edit-friendly DDPM inversion, the native DDPM and DDIM inversions, and regeneration / editing.

Reads like Secs. 2-3 of the paper. The network is any noise predictor

    f(x: Tensor[B, ...], t: Tensor[B] int64 timesteps, cond) -> eps: Tensor[B, ...]

(the SD1.x UNet with text embeddings as `cond`, a small test UNet, or the closed-form predictor of
the 2-D toy), so nothing below depends on the tensor shape: [B, 2] vectors or [B, 4, h, w] latents.

Index conventions (those of the authors' code, on which parity depends). With N sampling steps and
the descending grid `timesteps` (991, ..., 1 for N=100):

    xts[n], n = 0..N   x_n of the paper; xts[0] = x_0 (the input), xts[N] = x_T;
                       xts[n] is at network timestep timesteps[N - n]
    zs[n-1], n = 1..N  z_n of the paper: the noise of the step xts[n] -> xts[n-1]
    skip k             editing starts from xts[N - k] (timestep timesteps[k]) and uses
                       zs[N-k-1], ..., zs[0]; the code's k noisiest steps are not used.

Classifier-free guidance. eps = f_u + w (f_c - f_u) is computed from ONE batched call
of f over [uncond; cond]. When `cond` is None (no prompt, e.g. the authors' empty source prompt) or
`uncond` or `guidance` is None, there is no guidance term: a single call f(x, t, cond or uncond),
as the authors' code does for an empty source prompt. (SD's "" embedding is the uncond embedding,
so guidance with it would give the same eps up to rounding, at twice the cost.)

Precision. Everything, the trajectory and the noise maps included, is kept in a
working dtype of at least float32 (float64 stays float64); the network's output is cast to it, so
eq. 5 divides by sigma_t (0.02 at the last step) in float32 even when f runs in fp16. Exact
reconstruction needs the same mu formula, dtype and batch composition in inversion and
regeneration: regenerating one code with one prompt batches [x; x] exactly as the inversion did.

Randomness. Every draw comes from a torch.Generator you pass (recorded as its seed) or from an
explicit noise tensor; with neither, torch's global generator is used. Same seed, device and dtype:
bit-identical codes and outputs.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from efddpm.core import checks
from efddpm.core.atomic import write_atomically
from efddpm.core.checks import InputError
from efddpm.method.defaults import ETA, SOURCE_GUIDANCE, STEPS, TARGET_GUIDANCE, default_skip
from efddpm.method.scheduler import (SD1, ScheduleConfig, alphas_cumprod, ddpm_step, forward_chain_step,
                        marginal, mu, predicted_x0, step_coefficients, timesteps)

NoisePredictor = Callable[[Tensor, Tensor, Any], Tensor]
METHODS = ("edit_friendly", "native", "ddim")


# ---------------------------------------------------------------------------------------------
# The network, with classifier-free guidance
# ---------------------------------------------------------------------------------------------

def _rows(c: Tensor | None, k: int) -> Tensor | None:
    """A conditioning (or any per-sample tensor) with batch 1 or k, as batch k."""
    if c is None or c.shape[0] == k:
        return c
    if c.shape[0] == 1:
        return c.expand(k, *c.shape[1:])
    raise ValueError(f"batch {c.shape[0]} does not broadcast to {k}")


def guided_eps(f: NoisePredictor, x: Tensor, t: int | Tensor, cond: Tensor | None = None,
               uncond: Tensor | None = None, guidance: float | Sequence[float] | Tensor | None = None
               ) -> Tensor:
    """f_t(x) with classifier-free guidance f_u + w (f_c - f_u), one batched call over [uncond; cond].

    x: [K, ...]; t: one timestep, or one per row ([K]); cond, uncond: [K or 1, ...]; guidance: a
    number or one per row ([K]). Returns eps [K, ...] in x's dtype.
    """
    k = x.shape[0]
    tt = torch.as_tensor(t, dtype=torch.long, device=x.device).expand(k)       # [K]
    if cond is None or uncond is None or guidance is None:                    # no guidance term
        return f(x, tt, _rows(cond if cond is not None else uncond, k)).to(x.dtype)
    both = f(torch.cat([x, x]), torch.cat([tt, tt]),                          # [2K, ...]
             torch.cat([_rows(uncond, k), _rows(cond, k)]))
    f_u, f_c = both.to(x.dtype).chunk(2)                                      # [K, ...] each
    w = torch.as_tensor(guidance, dtype=x.dtype, device=x.device)
    w = w.reshape(-1, *([1] * (x.dim() - 1)))                                 # [K or 1, 1, ...]
    return f_u + w * (f_c - f_u)


# ---------------------------------------------------------------------------------------------
# The latent code
# ---------------------------------------------------------------------------------------------

@dataclass
class LatentCode:
    """An inversion: x_T, the noise maps z_T..z_1, the trajectory and how it was made.

    x_T:       [B, ...]        = xts[N]
    zs:        [N, B, ...]     zs[n-1] = z_n, the noise of the step xts[n] -> xts[n-1]
    xts:       [N+1, B, ...]   xts[0] = x_0, xts[n] at timestep timesteps[N-n]
    timesteps: [N] int64       descending
    settings:  method, num_steps, eta, guidance, seed, schedule, ... (JSON-serialisable)
    """
    x_T: Tensor
    zs: Tensor
    xts: Tensor
    timesteps: Tensor
    settings: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def schedule(self) -> ScheduleConfig:
        return ScheduleConfig(**self.settings.get("schedule", {}))

    def to(self, device: str | torch.device) -> "LatentCode":
        """The same code with its tensors on `device`."""
        xts = self.xts.to(device)
        return LatentCode(self.x_T.to(device), self.zs.to(device), xts, self.timesteps.to(device),
                          dict(self.settings))

    def save(self, path: str, overwrite: bool = True) -> None:
        """Write a .safetensors file, atomically (efddpm.core.atomic); the settings go in its metadata as JSON."""
        write_atomically(Path(path), self.write, overwrite=overwrite)

    def write(self, path: Path) -> None:
        """Write the .safetensors file at `path` as it is (save() does it atomically)."""
        from safetensors.torch import save_file
        tensors = {k: getattr(self, k).detach().contiguous().clone().cpu() for k in TENSORS}
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(self.settings, allow_nan=False)})

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> "LatentCode":
        """Read a code written by save(), checking every tensor and setting (InputError names what is wrong)."""
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                metadata, names = fh.metadata() or {}, set(fh.keys())
                if METADATA_KEY not in metadata or names != set(TENSORS):
                    raise InputError(f"{path} is not an efddpm latent code (tensors {sorted(names)}, "
                                     f"expected {list(TENSORS)} and {METADATA_KEY!r} metadata)")
                tensors = {k: fh.get_tensor(k) for k in TENSORS}
            settings = json.loads(metadata[METADATA_KEY])
        except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path} is not a readable efddpm latent code ({type(e).__name__})") from None
        code = cls(*(tensors[k] for k in TENSORS), settings)
        code.check(str(path))
        return code.to(device)

    def check(self, what: str = "latent code") -> None:
        """Raise InputError unless the tensors and settings are those of a code made here: every key, type,
        shape, dtype and value range, and the grid the settings name."""
        s = self.settings

        def bad(message: str):
            return InputError(f"{what}: {message}")
        if not isinstance(s, dict):
            raise bad("settings are not a dict")
        for key, kinds in SETTINGS.items():
            if key not in s:
                raise bad(f"settings lack {key!r}")
            if not isinstance(s[key], kinds) or (isinstance(s[key], bool) and bool not in kinds):
                raise bad(f"setting {key!r} has the wrong type ({type(s[key]).__name__})")
        if s["method"] not in METHODS:
            raise bad(f"unknown method {s['method']!r} (known: {', '.join(METHODS)})")
        try:
            schedule = ScheduleConfig(**s["schedule"])
            alphas_cumprod(schedule)                                     # refuses an unknown kind
            grid = timesteps(s["num_steps"], schedule)
            checks.eta(s["eta"], "eta")
            checks.skip(s["skip"], s["num_steps"], "skip")
            g = s["guidance"]
            if g is not None:
                checks.guidances(g, len(g) if isinstance(g, list) else 1, "guidance")
        except (TypeError, ValueError) as e:
            raise bad(f"bad settings ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        n, dtype = s["num_steps"], getattr(torch, s["dtype"], None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise bad(f"setting 'dtype' {s['dtype']!r} is not a floating dtype")
        rows = tuple(self.x_T.shape)
        for name, t, shape in (("x_T", self.x_T, rows), ("zs", self.zs, (n, *rows)), ("xts", self.xts, (n + 1, *rows))):
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise bad(f"{name} is {list(t.shape)} {t.dtype}, expected {list(shape)} {dtype}")
        if self.timesteps.dtype != torch.int64 or not torch.equal(self.timesteps.cpu(), grid):
            raise bad(f"timesteps are not the {n}-step grid of the code's schedule")
        used = n - s["skip"]                                           # zs[0..used-1] and xts[0..used] are used
        if not (torch.isfinite(self.zs[:used]).all() and torch.isfinite(self.xts[:used + 1]).all()):
            raise bad("holds NaN or infinite values")
        if not torch.equal(self.x_T, self.xts[n]):
            raise bad("x_T differs from xts[N]")


TENSORS = ("x_T", "zs", "xts", "timesteps")
METADATA_KEY = "efddpm.latent_code"
SETTINGS = {  # what every code's settings hold, and the JSON types of their values
    "method": (str,), "num_steps": (int,), "eta": (int, float), "guidance": (int, float, list, type(None)),
    "reference_direction": (bool,), "zero_last_noise": (bool,), "schedule": (dict,), "dtype": (str,),
    "noise": (str, type(None)), "seed": (int, type(None)), "skip": (int,),
}


def _working_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)   # at least float32: eq. 5 divides by sigma_t ~ 0.02


def _draw(shape, generator: torch.Generator | None, dtype: torch.dtype, device) -> Tensor:
    """Standard normal noise from `generator` (on its device) or from the global generator."""
    if generator is None:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device).to(device)


def _noise(num_steps: int, x0: Tensor, dtype, generator, noise) -> tuple[Tensor, dict]:
    """The N noise tensors of a trajectory, [N, B, ...]; noise[n-1] goes into xts[n]."""
    if noise is not None:
        if tuple(noise.shape) != (num_steps, *x0.shape):
            raise ValueError(f"noise must have shape {(num_steps, *x0.shape)}, got {tuple(noise.shape)}")
        return noise.to(x0.device, dtype), {"noise": "explicit", "seed": None}
    src = {"noise": "generator" if generator is not None else "global",
           "seed": generator.initial_seed() if generator is not None else None}
    return _draw((num_steps, *x0.shape), generator, dtype, x0.device), src


def _settings(method, num_steps, eta, guidance, schedule, dtype, reference_direction,
              zero_last_noise, src, meta) -> dict:
    g = guidance.tolist() if isinstance(guidance, Tensor) else guidance
    return {"method": method, "num_steps": num_steps, "eta": eta, "guidance": g,
            "reference_direction": reference_direction, "zero_last_noise": zero_last_noise,
            "schedule": asdict(schedule), "dtype": str(dtype).replace("torch.", ""),
            **src, **(meta or {})}


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


# ---------------------------------------------------------------------------------------------
# Sec. 3: noise extraction (eq. 5) and Algorithm 1
# ---------------------------------------------------------------------------------------------

def _tiled(c, times: int, rows: int):
    """A per-sample tensor (batch `rows` or 1) repeated for `times` steps stacked in one batch."""
    if not isinstance(c, Tensor) or c.dim() == 0:
        return c                                                            # None, or one number
    c = _rows(c, rows)
    return c.repeat(times, *([1] * (c.dim() - 1)))                          # [times * rows, ...]


def extract_noise(f: NoisePredictor, xts: Tensor, ts: Tensor, cond=None, uncond=None,
                  guidance=None, *, eta: float = 1.0, schedule: ScheduleConfig = SD1,
                  abar: Tensor | None = None, reference_direction: bool = False,
                  skip: int = 0, chunk: int = 1) -> Tensor:
    """z_t = (x_{t-1} - mu_t(x_t)) / sigma_t for t = T..1 (eq. 5), writing back
    x_{t-1} = mu_t(x_t) + sigma_t z_t (eq. 3) so that rounding does not drift.

    Modifies xts [N+1, B, ...] in place (the write-back); returns zs [N, B, ...].
    skip k: the k noisiest steps are not computed (their z are NaN); an edit with skip >= k
        never uses them, and saves k network calls.
    chunk: network evaluations of `chunk` consecutive steps in ONE batched call of f (batch
        chunk * B, or twice that with guidance). The x_t of a trajectory are all known before
        extraction, so the steps do not depend on each other but through the write-back, whose
        change is rounding: with chunk > 1, f and mu see x_t as stored before the write-back.
        chunk = 1 is Algorithm 1 to the letter.
    """
    abar = alphas_cumprod(schedule) if abar is None else abar
    n_steps, rows = ts.numel(), xts.shape[1]
    if not 0 <= skip < n_steps or chunk < 1:
        raise ValueError(f"need 0 <= skip < {n_steps} and chunk >= 1, got skip={skip}, chunk={chunk}")
    zs = torch.full_like(xts[1:], float("nan"))                             # [N, B, ...]
    ts = ts.tolist()                                                        # read once (no device sync per step)
    steps = list(range(n_steps - skip, 0, -1))                              # t = T - skip .. 1
    for first in range(0, len(steps), chunk):
        group = steps[first:first + chunk]                                  # the paper's t, descending
        coefs = [step_coefficients(abar, ts[n_steps - n], n_steps, schedule, eta,
                                   reference_direction) for n in group]
        if min(s.sigma for s in coefs) <= 0:
            raise ValueError("sigma_t = 0: eq. 5 needs eta > 0 and var_t > 0")
        x_in = xts[torch.tensor(group, device=xts.device)]                  # x_t (a copy), [C, B, ...]
        t_in = torch.tensor([s.t for s in coefs]).repeat_interleave(rows)   # [C * B]
        eps = guided_eps(f, x_in.flatten(0, 1), t_in,                       # f_t(x_t), [C * B, ...]
                         _tiled(cond, len(group), rows), _tiled(uncond, len(group), rows),
                         _tiled(guidance, len(group), rows)).view_as(x_in)
        for x, e, n, s in zip(x_in, eps, group, coefs):
            zs[n - 1] = (xts[n - 1] - mu(x, e, s)) / s.sigma                # eq. 5
            xts[n - 1] = ddpm_step(x, e, s, zs[n - 1])                      # eq. 3 (write-back)
    return zs


def _invert(method: str, trajectory, f, x0, cond, uncond, guidance, num_steps, eta, generator,
            noise, schedule, abar, reference_direction, zero_last_noise, meta, skip=0, chunk=1
            ) -> LatentCode:
    dtype = _working_dtype(x0)
    abar = alphas_cumprod(schedule) if abar is None else abar
    ts = timesteps(num_steps, schedule)
    eps_tilde, src = _noise(num_steps, x0, dtype, generator, noise)        # [N, B, ...]
    xts = trajectory(x0.to(dtype), abar, ts, eps_tilde)                     # [N+1, B, ...]
    zs = extract_noise(f, xts, ts, cond, uncond, guidance, eta=eta, schedule=schedule, abar=abar,
                       reference_direction=reference_direction, skip=skip, chunk=chunk)
    if zero_last_noise:          # the authors' choice: the last step x_1 -> x_0 is deterministic
        zs[0] = 0
    settings = _settings(method, num_steps, eta, guidance, schedule, dtype, reference_direction,
                         zero_last_noise, src, meta)
    settings["skip"] = skip  # edits need skip >= this: the noisier z's were not computed
    return LatentCode(xts[num_steps], zs, xts, ts, settings)


def edit_friendly_inversion(f: NoisePredictor, x0: Tensor, cond=None, uncond=None,
                            guidance=SOURCE_GUIDANCE, *, num_steps: int = STEPS, eta: float = ETA,
                            generator: torch.Generator | None = None, noise: Tensor | None = None,
                            schedule: ScheduleConfig = SD1, abar: Tensor | None = None,
                            reference_direction: bool = False, zero_last_noise: bool = False,
                            meta: dict | None = None, skip: int = 0, chunk: int = 1) -> LatentCode:
    """Algorithm 1: draw x_1..x_T independently by eq. 6, then extract z_T..z_1 by eq. 5 with
    write-back. Replaying eq. 3 with the code and the same cond/guidance returns x_0 exactly.

    x0: [B, ...] (each row gets its own noise); noise: optional eps~ [N, B, ...], noise[n-1] for
    xts[n]; zero_last_noise / reference_direction: the authors' code (audit options, see docs/numerics.md);
    skip / chunk: leave out the steps an edit with that skip never uses, and evaluate f for
    several steps in one batched call (see extract_noise).
    """
    return _invert("edit_friendly", edit_friendly_trajectory, f, x0, cond, uncond, guidance,
                   num_steps, eta, generator, noise, schedule, abar, reference_direction,
                   zero_last_noise, meta, skip, chunk)


def native_inversion(f: NoisePredictor, x0: Tensor, cond=None, uncond=None, guidance=SOURCE_GUIDANCE, *,
                     num_steps: int = STEPS, eta: float = ETA,
                     generator: torch.Generator | None = None, noise: Tensor | None = None,
                     schedule: ScheduleConfig = SD1, abar: Tensor | None = None,
                     reference_direction: bool = False, zero_last_noise: bool = False,
                     meta: dict | None = None, skip: int = 0, chunk: int = 1) -> LatentCode:
    """The native DDPM inversion (Sec. 2.1), for comparison: x_1..x_T from the forward chain
    (eq. 1), then z_T..z_1 by eq. 5. Also reconstructs exactly, but does not edit well."""
    return _invert("native", native_trajectory, f, x0, cond, uncond, guidance, num_steps, eta,
                   generator, noise, schedule, abar, reference_direction, zero_last_noise, meta,
                   skip, chunk)


def diverse_inversions(f: NoisePredictor, x0: Tensor, seeds: Sequence[int], *args, **kwargs
                       ) -> list[LatentCode]:
    """Several edit-friendly inversions of one image, one per seed (for diverse edits)."""
    return [edit_friendly_inversion(f, x0, *args,
                                    generator=torch.Generator(x0.device).manual_seed(int(s)),
                                    **kwargs) for s in seeds]


def ddim_inversion(f: NoisePredictor, x0: Tensor, cond=None, uncond=None, guidance=SOURCE_GUIDANCE, *,
                   num_steps: int = STEPS, schedule: ScheduleConfig = SD1,
                   abar: Tensor | None = None, meta: dict | None = None) -> LatentCode:
    """DDIM inversion, the classic baseline: run the deterministic (eta = 0) step backwards,
    x_t = sqrt(abar_t) P + sqrt(1 - abar_t) f with P predicted from x_{t_prev} (eq. 2 with the
    predicted noise), evaluating f at x_{t_prev} with timestep t (the usual approximation).
    The code's zs are zero and eta = 0; regeneration is exact only if f barely changes with x.
    """
    dtype = _working_dtype(x0)
    abar = alphas_cumprod(schedule) if abar is None else abar
    ts = timesteps(num_steps, schedule)
    xts = torch.empty((num_steps + 1, *x0.shape), dtype=dtype, device=x0.device)
    xts[0] = x0
    for n in range(1, num_steps + 1):                                      # t = 1 .. T
        s = step_coefficients(abar, int(ts[num_steps - n]), num_steps, schedule, eta=0.0)
        eps = guided_eps(f, xts[n - 1], s.t, cond, uncond, guidance)       # f_t(x_{t_prev})
        xts[n] = marginal(predicted_x0(xts[n - 1], eps, s.abar_prev), s.abar_t, eps)  # eq. 2, 4
    settings = _settings("ddim", num_steps, 0.0, guidance, schedule, dtype, False, False,
                         {"noise": None, "seed": None}, meta)
    settings["skip"] = 0
    return LatentCode(xts[num_steps], torch.zeros_like(xts[1:]), xts, ts, settings)


# ---------------------------------------------------------------------------------------------
# Sec. 3: regeneration and editing
# ---------------------------------------------------------------------------------------------

NoiseEdit = Callable[[int, Tensor, Tensor], Tensor]   # (n, z_n [K, ...], P(f) [K, ...]) -> z_n


def regenerate(f: NoisePredictor, code: LatentCode, cond=None, uncond=None, guidance=None, *,
               skip: int = 0, eta: float | None = None, reference_direction: bool | None = None,
               zero_last_noise: bool = False, noise_edit: NoiseEdit | None = None,
               abar: Tensor | None = None) -> Tensor:
    """Replay eq. 3 with the code's noise maps: x_{t-1} = mu_t(x_t) + sigma_t z_t.

    cond: [K or 1, ...] target condition(s); guidance: a number or one per target ([K]); None
    means the guidance the code was inverted with. The code (batch B) is broadcast over the K
    targets when B = 1, or paired row by row when B = K. Starts from x_T (skip = 0) or from
    xts[N - skip] (skip > 0; x_T is xts[N] for the codes made here).
    eta / reference_direction: None means the code's. zero_last_noise: use z_1 = 0 (the
    authors' choice; the output then differs from x_0 by sigma_1 z_1). noise_edit(n, z_n, P):
    replaces z_n before it is used, for manipulations (n is the paper's t, from N-skip down to 1).
    Returns x_0 [K, ...] in the code's dtype.
    """
    st = code.settings
    schedule = code.schedule
    eta = st["eta"] if eta is None else eta
    reference_direction = st.get("reference_direction", False) if reference_direction is None \
        else reference_direction
    guidance = st.get("guidance") if guidance is None else guidance
    abar = alphas_cumprod(schedule) if abar is None else abar
    n_steps, ts = code.num_steps, code.timesteps.tolist()                  # read once (no device sync per step)
    if not 0 <= skip < n_steps:
        raise ValueError(f"skip must be in 0..{n_steps - 1}, got {skip}")
    if skip < st.get("skip", 0):
        raise ValueError(f"this code was inverted for edits with skip >= {st['skip']} (its noisier "
                         f"noise maps were never computed), got skip={skip}")
    rows = [code.xts.shape[1]] + [c.shape[0] for c in (cond, uncond) if c is not None]
    if guidance is not None and torch.as_tensor(guidance).numel() > 1:
        rows.append(torch.as_tensor(guidance).numel())
    k = max(rows)
    start = code.x_T if skip == 0 else code.xts[n_steps - skip]            # x_t at t = ts[skip]
    x = _rows(start.to(code.zs.dtype), k)                                  # [K, ...]
    for n in range(n_steps - skip, 0, -1):                                 # paper's t = n
        s = step_coefficients(abar, ts[n_steps - n], n_steps, schedule, eta, reference_direction)
        eps = guided_eps(f, x, s.t, cond, uncond, guidance)                # f_t(x_t), [K, ...]
        z = _rows(code.zs[n - 1], k)                                       # z_n, [K, ...]
        if zero_last_noise and n == 1:
            z = torch.zeros_like(z)
        if noise_edit is not None:
            z = noise_edit(n, z, predicted_x0(x, eps, s.abar_t))
        x = ddpm_step(x, eps, s, z)                                        # eq. 3
    return x


def edit(f: NoisePredictor, code: LatentCode, cond=None, uncond=None, guidance=TARGET_GUIDANCE, *,
         skip: int | None = None, eta: float | None = None, **kwargs) -> Tensor:
    """Text-based editing (Sec. 3): regenerate with the target prompt(s) and guidance(s), from
    T - T_skip. Defaults (efddpm.method.defaults): w_tgt = 15, T_skip = 36 of 100 scaled to the code's
    steps, eta = the code's (1)."""
    skip = default_skip(code.num_steps) if skip is None else skip
    return regenerate(f, code, cond, uncond, guidance, skip=skip, eta=eta, **kwargs)
