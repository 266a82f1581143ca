"""The DDPM noise schedule of SD1.x and the equations of Sec. 2 of the paper (eqs. 1-4).

Pure functions over explicit tensors and numbers: nothing here keeps state. Names follow the paper:

    abar_t  = prod_{s<=t} (1 - beta_s)            (alpha-bar, "alphas_cumprod")
    (1)  x_t     = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) n_t          forward chain
    (2)  x_t     = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_t            its marginal
    (3)  x_{t-1} = mu_t(x_t) + sigma_t z_t                              DDPM sampling step
    (4)  mu_t    = sqrt(abar_prev) P(f_t(x_t)) + D(f_t(x_t))
         P(f)    = (x_t - sqrt(1 - abar_t) f) / sqrt(abar_t)            predicted x_0
         D(f)    = sqrt(1 - abar_prev - sigma_t^2) f                    direction pointing to x_t

Timesteps are the training indices 0..999 of SD1.x. Sampling uses a strided grid of N of them
("leading" spacing plus steps_offset=1: 991, 981, ..., 1 for N=100); "prev" is the next grid point
below, t - 1000 // N, and when that is negative abar_prev is abar_0 (set_alpha_to_one=False), not 1.

Precision: the tables are computed in float32 by default, exactly as diffusers and the authors'
code do (linspace of sqrt(beta) in float32, squared, cumprod in float32); pass dtype=torch.float64
for a float64 table. Per-step coefficients are returned as Python floats (float64) computed from the
table entries, and are applied in the dtype of the tensors they multiply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule and the inference-grid rule. Defaults: Stable Diffusion 1.x."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    kind: str = "scaled_linear"      # "scaled_linear" (SD1.x) or "linear" (DDPM; the 2-D toy)
    steps_offset: int = 1            # added to every grid point (SD1.x: 1, so the grid ends at t=1)
    set_alpha_to_one: bool = False   # abar_prev below t=0: abar_0 (False, SD1.x) or 1 (True)


SD1 = ScheduleConfig()


# ---------------------------------------------------------------------------------------------
# Training tables
# ---------------------------------------------------------------------------------------------

def betas(cfg: ScheduleConfig = SD1, dtype: torch.dtype = torch.float32) -> Tensor:
    """beta_t for t = 0..T-1, shape [T]."""
    T = cfg.num_train_timesteps
    if cfg.kind == "scaled_linear":   # linear in sqrt(beta)
        return torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=dtype) ** 2
    if cfg.kind == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=dtype)
    raise ValueError(f"unknown schedule kind {cfg.kind!r} (expected 'scaled_linear' or 'linear')")


def alphas_cumprod(cfg: ScheduleConfig = SD1, dtype: torch.dtype = torch.float32) -> Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s) for t = 0..T-1, shape [T]."""
    return torch.cumprod(1.0 - betas(cfg, dtype), dim=0)


def final_alpha_cumprod(abar: Tensor, cfg: ScheduleConfig = SD1) -> float:
    """abar used as "prev" below the first training step: 1, or abar_0 for SD1.x (set_alpha_to_one=False)."""
    return 1.0 if cfg.set_alpha_to_one else float(abar[0])


def check_alphas_cumprod(table: Tensor, cfg: ScheduleConfig = SD1, atol: float = 1e-6) -> None:
    """Raise ValueError when a checkpoint's alphas_cumprod differs from the one `cfg` computes.

    LDM/SD checkpoints carry the training table as a buffer ("alphas_cumprod"). The SD1.x
    checkpoints store it in float32, computed like here, so they agree to ~1e-7.
    """
    ours = alphas_cumprod(cfg, torch.float64)
    table = torch.as_tensor(table).detach().to("cpu", torch.float64).flatten()
    if table.shape != ours.shape:
        raise ValueError(f"checkpoint alphas_cumprod has {table.numel()} entries, the schedule "
                         f"{cfg} has {ours.numel()}")
    err = (table - ours).abs()
    if float(err.max()) > atol:
        i = int(err.argmax())
        raise ValueError(f"checkpoint alphas_cumprod differs from the schedule {cfg}: at t={i} it is "
                         f"{float(table[i]):.9g}, computed {float(ours[i]):.9g} "
                         f"(max abs difference {float(err.max()):.3g} > {atol:g})")


# ---------------------------------------------------------------------------------------------
# Inference grid
# ---------------------------------------------------------------------------------------------

def timesteps(num_steps: int, cfg: ScheduleConfig = SD1) -> Tensor:
    """The N sampling timesteps, descending, shape [N] int64 ("leading" spacing + offset).

    t_i = (N-1-i) * (T // N) + steps_offset, i = 0..N-1; SD1.x, N=100: 991, 981, ..., 11, 1.
    """
    T = cfg.num_train_timesteps
    if not 1 <= num_steps <= max_steps(cfg):
        raise ValueError(f"num_steps must be in 1..{max_steps(cfg)}, got {num_steps}")
    ratio = T // num_steps
    ts = (np.arange(num_steps)[::-1] * ratio + cfg.steps_offset).astype(np.int64)
    return torch.from_numpy(ts.copy())


def max_steps(cfg: ScheduleConfig = SD1) -> int:
    """The most sampling steps whose grid stays inside the training schedule: with steps_offset 1 (SD1.x) the
    1000-step grid would start at t = 1000, one past the last training timestep 999, so SD1.x allows 999."""
    T = cfg.num_train_timesteps
    return max(n for n in range(1, T + 1) if (n - 1) * (T // n) + cfg.steps_offset < T)


def previous_timestep(t: int, num_steps: int, cfg: ScheduleConfig = SD1) -> int:
    """The grid point below t: t - T // N (negative for the last step)."""
    return int(t) - cfg.num_train_timesteps // num_steps


def abar_at(abar: Tensor, t: int, cfg: ScheduleConfig = SD1) -> float:
    """abar_t as a float; below t = 0 it is final_alpha_cumprod (abar_0 for SD1.x, not 1)."""
    return float(abar[t]) if t >= 0 else final_alpha_cumprod(abar, cfg)


def variance(abar_t: float, abar_prev: float) -> float:
    """var_t = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev), the strided posterior
    variance (for stride 1 the paper's beta_t (1 - abar_{t-1}) / (1 - abar_t))."""
    return (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)


@dataclass(frozen=True)
class Step:
    """The numbers of one reverse step t -> prev (eqs. 3-4)."""
    t: int               # training timestep of x_t
    t_prev: int          # the grid point below (negative for the last step)
    abar_t: float
    abar_prev: float
    var: float           # var_t
    sigma: float         # sigma_t = eta * sqrt(var_t)
    dir_coef: float      # sqrt(1 - abar_prev - sigma_t^2): the coefficient of f in D


def step_coefficients(abar: Tensor, t: int, num_steps: int, cfg: ScheduleConfig = SD1, eta: float = 1.0,
         reference_direction: bool = False) -> Step:
    """Coefficients of the reverse step at timestep t.

    reference_direction=True uses the authors' D coefficient sqrt(1 - abar_prev - eta * var_t)
    instead of the paper's sqrt(1 - abar_prev - sigma_t^2); they agree only at eta in {0, 1}.
    """
    t = int(t)
    t_prev = previous_timestep(t, num_steps, cfg)
    a_t, a_prev = abar_at(abar, t, cfg), abar_at(abar, t_prev, cfg)
    var = variance(a_t, a_prev)
    sig = eta * math.sqrt(var)                                             # sigma_t: eta 1 is DDPM, 0 DDIM
    d2 = 1.0 - a_prev - (eta * var if reference_direction else sig ** 2)  # eq. 4 (D's coefficient, squared)
    if d2 < 0:
        raise ValueError(f"1 - abar_prev - sigma^2 < 0 at t={t} (eta={eta} too large)")
    return Step(t, t_prev, a_t, a_prev, var, sig, math.sqrt(d2))


# ---------------------------------------------------------------------------------------------
# The equations
# ---------------------------------------------------------------------------------------------

def forward_chain_step(x_prev: Tensor, beta: float, n: Tensor) -> Tensor:
    """x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) n_t, n_t ~ N(0, I).                  eq. 1

    Over a stride of the grid, pass beta = 1 - abar_t / abar_s: the product of the per-step
    (1 - beta) over the stride, i.e. eq. 1 composed exactly.
    """
    return math.sqrt(1.0 - beta) * x_prev + math.sqrt(beta) * n  # eq. 1


def marginal(x0: Tensor, abar_t: float, eps: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.                                     eq. 2"""
    return math.sqrt(abar_t) * x0 + math.sqrt(1.0 - abar_t) * eps  # eq. 2


def predicted_x0(x_t: Tensor, eps: Tensor, abar_t: float) -> Tensor:
    """P(f_t(x_t)) = (x_t - sqrt(1 - abar_t) f) / sqrt(abar_t), the predicted x_0.        eq. 4"""
    return (x_t - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)  # eq. 4 (P)


def direction(eps: Tensor, s: Step) -> Tensor:
    """D(f_t(x_t)) = sqrt(1 - abar_prev - sigma_t^2) f, the direction pointing to x_t.  eq. 4"""
    return s.dir_coef * eps  # eq. 4 (D)


def mu(x_t: Tensor, eps: Tensor, s: Step) -> Tensor:
    """mu_t(x_t) = sqrt(abar_prev) P(f_t(x_t)) + D(f_t(x_t)).                           eq. 4"""
    return math.sqrt(s.abar_prev) * predicted_x0(x_t, eps, s.abar_t) + direction(eps, s)  # eq. 4


def ddpm_step(x_t: Tensor, eps: Tensor, s: Step, z: Tensor) -> Tensor:
    """x_{t-1} = mu_t(x_t) + sigma_t z_t.                                                  eq. 3"""
    return mu(x_t, eps, s) + s.sigma * z  # eq. 3


# ---------------------------------------------------------------------------------------------
# In diffusers' terms
# ---------------------------------------------------------------------------------------------

def diffusers_config(cfg: ScheduleConfig = SD1) -> dict:
    """The schedule and grid rule of `cfg` as diffusers' scheduler arguments (DDIMScheduler takes them all;
    DDPMScheduler all but set_alpha_to_one): the same tables, the same N-step grid, no clipping of P(f)."""
    return dict(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                beta_schedule=cfg.kind, timestep_spacing="leading", steps_offset=cfg.steps_offset,
                set_alpha_to_one=cfg.set_alpha_to_one, clip_sample=False)
