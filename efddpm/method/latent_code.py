"""The latent code of an inversion: x_T, the noise maps z_T..z_1, the trajectory, and how it was made.

Index conventions (those of the authors' code, on which parity depends). With N sampling steps and the descending
grid `timesteps` (991, ..., 1 for N = 100):

    xts[n], n = 0..N   x_n of the paper; xts[0] = x_0 (the input), xts[N] = x_T; xts[n] is at network timestep
                       timesteps[N - n]
    zs[n-1], n = 1..N  z_n of the paper: the noise of the step xts[n] -> xts[n-1]
    skip k             editing starts from xts[N - k] (timestep timesteps[k]) and uses zs[N-k-1], ..., zs[0]; a code
                       inverted with settings["skip"] = k never computed the k noisiest maps (they are NaN)

A code saved with save() is a .safetensors file (the four tensors; the settings as JSON in its metadata); load()
checks every tensor and setting, so a damaged or foreign file is refused with one line naming what is wrong.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from efddpm.core import checks
from efddpm.core.atomic import write_atomically
from efddpm.core.checks import InputError
from efddpm.method.scheduler import ScheduleConfig, alphas_cumprod, timesteps

METHODS = ("edit_friendly", "native", "ddim")
TENSORS = ("x_T", "zs", "xts", "timesteps")
METADATA_KEY = "efddpm.latent_code"
SETTINGS = {  # what every code's settings hold, and the JSON types of their values
    "method": (str,), "num_steps": (int,), "eta": (int, float), "guidance": (int, float, list, type(None)),
    "reference_direction": (bool,), "zero_last_noise": (bool,), "schedule": (dict,), "dtype": (str,),
    "noise": (str, type(None)), "seed": (int, type(None)), "skip": (int,),
}


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
        """The same code with its tensors on `device`; the timestep grid stays on the host, where the loops read it
        (reading it from a GPU would make the host wait for the GPU)."""
        xts = self.xts.to(device)
        return LatentCode(self.x_T.to(device), self.zs.to(device), xts, self.timesteps.cpu(), dict(self.settings))

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
        if isinstance(settings, dict) and settings.get("method") == "ddim":
            settings.setdefault("skip", 0)   # DDIM codes saved before "skip" was recorded: every map is there
        code = cls(*(tensors[k] for k in TENSORS), settings)
        code.check(str(path))
        return code.to(checks.device(device))

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
        batch = self.x_T.shape[0] if self.x_T.dim() >= 2 else 0
        if batch < 1:
            raise bad(f"x_T is {list(self.x_T.shape)}, expected [B >= 1, ...]")
        try:
            schedule = checked_schedule(s["schedule"])
            grid = timesteps(s["num_steps"], schedule)
            checks.eta(s["eta"], "eta")
            checks.skip(s["skip"], s["num_steps"], "skip")
            g = s["guidance"]
            if g is not None:
                checks.guidances(g, batch if isinstance(g, list) else 1, "guidance")
        except (TypeError, ValueError, RuntimeError) as e:
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


def checked_schedule(values) -> ScheduleConfig:
    """A schedule from a code's settings, refused (ValueError) unless its numbers make a training schedule."""
    schedule = ScheduleConfig(**values)
    T, start, end = schedule.num_train_timesteps, schedule.beta_start, schedule.beta_end
    if not (isinstance(T, int) and 1 <= T <= 10_000 and isinstance(start, (int, float))
            and isinstance(end, (int, float)) and 0 < start < end < 1 and isinstance(schedule.steps_offset, int)
            and 0 <= schedule.steps_offset < T and isinstance(schedule.set_alpha_to_one, bool)):
        raise ValueError(f"not a training schedule: {values}")
    alphas_cumprod(schedule)                                              # refuses an unknown kind
    return schedule


def code_settings(*, method: str, num_steps: int, eta: float, guidance, schedule: ScheduleConfig, dtype: torch.dtype,
                  reference_direction: bool, zero_last_noise: bool, skip: int, noise: str | None, seed: int | None,
                  meta: dict | None = None) -> dict:
    """The settings every code records (SETTINGS), then `meta` (the caller's: prompt, model, ...)."""
    g = guidance.tolist() if isinstance(guidance, Tensor) else guidance
    return {"method": method, "num_steps": num_steps, "eta": eta, "guidance": g,
            "reference_direction": reference_direction, "zero_last_noise": zero_last_noise,
            "schedule": asdict(schedule), "dtype": str(dtype).replace("torch.", ""), "noise": noise, "seed": seed,
            **(meta or {}), "skip": skip}
