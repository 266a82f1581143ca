"""Validation at the edges, once: the numbers, devices and tensors a user hands to `Editor` or the command line.

Every check raises InputError (a ValueError) whose message is one line naming the setting, the value and what
is allowed; the command line prints it as `efddpm: error: ...` and exits with code 2, the API raises it. `name`
is how the caller spells the setting ("guidance" in the API, "--cfg-tgt" on the command line).
"""
from __future__ import annotations

import math
import numbers
import os

import torch

MAX_GUIDANCE = 100.0      # classifier-free guidance beyond this overflows or saturates every pixel
MAX_STRENGTH = 100.0      # colour manipulation strength s
MAX_SEED = 2 ** 63 - 1    # torch.Generator.manual_seed takes 64-bit seeds; one more bit is kept for seed + k


class InputError(ValueError):
    """A bad input to efddpm: the message is one line naming the setting and what is allowed."""


def out_of_memory(e: BaseException, kept: str = "nothing was written") -> InputError:
    """The one-line error for running out of memory (MemoryError, torch.OutOfMemoryError), saying what was kept."""
    first = str(e).splitlines()[0] if str(e) else "MemoryError"
    return InputError(f"out of memory ({first}); try a smaller --size or another --device; {kept}")


def number(name: str, value, *, low: float | None = None, high: float | None = None) -> float:
    """A finite real number in [low, high] (bools are refused: True is not a guidance)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{name} must be in [{_fmt(low, '-inf')}, {_fmt(high, 'inf')}], got {_fmt(value)}")
    return value


def integer(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """An int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{name} must be in {_fmt(low)}..{_fmt(high)}, got {value}")
    return value


def _fmt(v, missing: str = "") -> str:
    return missing if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def steps(value, most: int, name: str = "steps") -> int:
    """N sampling steps, 1..most (most: efddpm.method.scheduler.max_steps, 999 for SD1.x)."""
    return integer(name, value, low=1, high=most)


def skip(value, num_steps: int, name: str = "skip", *, inverted_skip: int = 0) -> int:
    """T_skip: 0..N-1, and at least the skip a latent code was inverted for (its noisier maps do not exist)."""
    value = integer(name, value, low=0, high=num_steps - 1)
    if value < inverted_skip:
        raise InputError(f"{name} must be at least {inverted_skip} for this latent code (it was inverted for edits "
                         f"with skip >= {inverted_skip}; its noisier noise maps were never computed), got {value}")
    return value


def guidance(value, name: str = "guidance") -> float:
    return number(name, value, low=0.0, high=MAX_GUIDANCE)


def guidances(value, n: int, name: str = "guidance") -> list[float]:
    """One guidance weight, or one per prompt (n), as a list of n weights."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) not in (1, n):
        raise InputError(f"{name} takes one value or one per prompt ({n}), got {len(values)}")
    values = [guidance(v, name) for v in values]
    return values * n if len(values) == 1 else values


def eta(value, name: str = "eta") -> float:
    return number(name, value, low=0.0, high=1.0)


def inversion_eta(value, name: str = "eta") -> float:
    """eta of a DDPM inversion: in (0, 1], since eq. 5 divides by sigma_t = eta * sqrt(var_t)."""
    value = eta(value, name)
    if value == 0:
        raise InputError(f"{name} must be above 0: the edit-friendly inversion divides by sigma_t = eta * sqrt(var_t)")
    return value


def seed(value, name: str = "seed", count: int = 1) -> int:
    """A seed for torch.Generator; `count` consecutive seeds (seed, seed + 1, ...) must all be valid."""
    return integer(name, value, low=0, high=MAX_SEED - (count - 1))


def strength(value, name: str = "strength") -> float:
    return number(name, value, low=0.0, high=MAX_STRENGTH)


def step_range(value, num_steps: int, name: str = "step_range") -> tuple[int, int]:
    """[T1, T2] in the paper's t, 1..N (1 = the last step)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InputError(f"{name} must be two steps (T1, T2), got {value!r}")
    low, high = sorted(integer(name, v) for v in value)
    if low < 1 or high > num_steps:
        raise InputError(f"{name} must lie in 1..{num_steps}, got {list(value)}")
    return low, high


def shift(dy, dx, latent_size: tuple[int, int], names: tuple[str, str] = ("dy", "dx")) -> tuple[int, int]:
    """A shift of the latent grid: less than its height / width in absolute value."""
    return tuple(integer(n, v, low=-(side - 1), high=side - 1) for n, v, side in zip(names, (dy, dx), latent_size))


def device(value, name: str = "device") -> torch.device:
    """A device that exists here: "cpu", "cuda", "cuda:1", "mps"."""
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{name} {value!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{name} {value}: CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{name} {value}: there are {torch.cuda.device_count()} CUDA devices")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"{name} {value}: MPS is not available here")
    elif dev.type != "cpu":
        raise InputError(f"{name} {value}: only cpu, cuda and mps devices are supported")
    return dev


def finite_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise InputError(f"{name} holds NaN or infinite values")
    return t


def memory_bytes(device: torch.device) -> int:
    """Total memory of the device (not what is free now: the same refusals whatever else runs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2 ** 36  # unknown: assume 64 GiB


# ------------------------------------------------------------------------- Prompt-to-Prompt (efddpm.method.p2p)

MAX_REWEIGHT = 100.0      # a word's attention scale beyond this overflows like a guidance would
P2P_WINDOWS = ("all", "run")


def fraction(value, name: str) -> float:
    """A fraction of the steps, in [0, 1]."""
    return number(name, value, low=0.0, high=1.0)


def p2p_window(value, name: str = "window") -> str:
    """What P2P's xa and sa are fractions of: "all" N steps (the authors'), or the N - skip steps "run"."""
    if value not in P2P_WINDOWS:
        raise InputError(f"{name} must be one of {', '.join(P2P_WINDOWS)}, got {value!r}")
    return value


def words_of(prompt: str) -> list[str]:
    """A prompt's words as Prompt-to-Prompt finds them: split on single spaces, matched exactly."""
    return prompt.split(" ")


def word_list(value, name: str) -> tuple[str, ...]:
    """One word or a list of them, each a non-empty string without spaces."""
    words = [value] if isinstance(value, str) else value
    if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w and " " not in w for w in words):
        raise InputError(f"{name} must be words (strings without spaces), got {value!r}")
    return tuple(words)


def blend_words(value, prompts: list[str], name: str = "blend") -> tuple[str, ...]:
    """Local-blend words: each one a word of at least one of the prompts (the source or a target)."""
    words = word_list(value, name)
    for word in words:
        if not any(word in words_of(p) for p in prompts):
            raise InputError(f"{name} word {word!r} is not a word of the source or target prompts ("
                             f"{' | '.join(repr(p) for p in prompts)}); words are split on spaces and match exactly")
    return words


def reweights(value, targets: list[str], name: str = "reweight") -> dict[str, float]:
    """{word: scale}: each word a word of every target prompt, each scale finite in [-100, 100]."""
    if not isinstance(value, dict):
        raise InputError(f"{name} must map words to scales, got {value!r}")
    out = {}
    for word, scale in value.items():
        word_list(word, name)
        missing = next((t for t in targets if word not in words_of(t)), None)
        if missing is not None:
            raise InputError(f"{name} word {word!r} is not a word of the target prompt {missing!r}; words are split "
                             "on spaces and match exactly")
        out[word] = number(f"{name} {word}", scale, low=-MAX_REWEIGHT, high=MAX_REWEIGHT)
    return out


def reweight_flag(text: str, name: str = "--reweight") -> tuple[str, float]:
    """WORD=SCALE as written on the command line."""
    word, sep, scale = text.rpartition("=")
    try:
        value = float(scale)
    except ValueError:
        value = None
    if not sep or not word or value is None:
        raise InputError(f"{name} must be WORD=SCALE (e.g. blue=2), got {text!r}")
    return word, value
