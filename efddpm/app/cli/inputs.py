"""What every subcommand checks before it loads a model: the numbers, the input files, the output names.

Each check raises UsageError (an InputError) with one line naming the flag or file and what is wrong with it.
"""
import secrets
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from efddpm.app import prompt_to_prompt
from efddpm.app.cli.parser import UsageError
from efddpm.app.datasets import ENTRY_OPTIONS, DatasetItem
from efddpm.app.images import ImageError, load_mask, open_image
from efddpm.core import checks
from efddpm.method.defaults import default_skip
from efddpm.method.latent_code import LatentCode
from efddpm.method.p2p import P2P
from efddpm.method.scheduler import max_steps


def check_settings(args) -> None:
    """The numbers, before any work: finite, in range, and consistent with each other."""
    args.steps = checks.steps(args.steps, max_steps(), "--steps")
    if getattr(args, "skip", None) is not None:
        args.skip = checks.skip(args.skip, args.steps, "--skip")
    elif args.command in ("edit", "batch"):
        args.skip = default_skip(args.steps)            # shift: the model's (commands.shift, once it is loaded)
    if args.cfg_src is not None:                         # recolor: the model's (commands.recolor, likewise)
        checks.guidance(args.cfg_src, "--cfg-src")
    if getattr(args, "cfg_tgt", None) is not None:
        targets = getattr(args, "target", None)
        if isinstance(args.cfg_tgt, list):
            args.cfg_tgt = checks.guidances(args.cfg_tgt, len(targets), "--cfg-tgt")
        else:
            checks.guidance(args.cfg_tgt, "--cfg-tgt")
    args.eta = checks.inversion_eta(args.eta, "--eta")
    count = getattr(args, "num_inversions", 1)
    checks.integer("--num-inversions", count, low=1, high=1000)
    if args.seed is not None:
        checks.seed(args.seed, "--seed", count)
    if args.size is not None:
        checks.integer("--size", args.size, low=8)
    if getattr(args, "noise", None) and count > 1:
        raise UsageError("--noise gives the draws of one inversion; it cannot be combined with --num-inversions")
    if getattr(args, "p2p", False) and count > 1:
        raise UsageError("--p2p edits one inversion; it cannot be combined with --num-inversions")
    if hasattr(args, "p2p"):
        check_p2p_flags(args)


P2P_FLAGS = {key: f"--{key.replace('_', '-')}" for key in ENTRY_OPTIONS if key != "p2p"}   # xa: --xa, ...


def check_p2p_flags(args) -> None:
    """The Prompt-to-Prompt flags need --p2p; --reweight WORD=SCALE becomes {word: scale}."""
    if args.reweight:
        args.reweight = dict(checks.reweight_flag(text) for text in args.reweight)
    used = [flag for key, flag in P2P_FLAGS.items() if getattr(args, key) is not None]
    if used and not args.p2p:
        raise UsageError(f"{used[0]} needs --p2p")


def p2p_settings(args, source: str, targets: list[str], entry: dict | None = None, where: str = "",
                 defaults: P2P | None = None) -> P2P | None:
    """--p2p and its flags, a batch entry's keys over them, as checked settings; None for a plain edit.
    where: how to name an entry's keys in errors ("batch file F: entry 2: "); defaults: what neither gives (None:
    P2P()'s; batch --method ddim: the authors' DDIM + P2P fractions, efddpm.method.p2p.defaults_for)."""
    entry = entry or {}
    given = {key: entry[key] if key in entry else getattr(args, key, None) for key in ("p2p", *P2P_FLAGS)}
    names = {key: f"{where}{key}" if key in entry else flag for key, flag in P2P_FLAGS.items()}
    if not given["p2p"]:
        if used := [names[k] for k in P2P_FLAGS if k in entry]:
            raise UsageError(f"{used[0]} needs p2p")
        return None
    fields = {"xa": "xa", "sa": "sa", "p2p_window": "window", "blend": "blend", "reweight": "reweight"}
    p2p = replace(defaults or P2P(), **{field: given[key] for key, field in fields.items() if given[key] is not None})
    return prompt_to_prompt.checked(p2p, source, targets, {"window": names.pop("p2p_window"), **names})


def check_output_folder(folder: Path) -> None:
    """The folder (or, when missing, its nearest existing parent) must be a writable directory."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"output folder {folder}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(f"output folder {folder} is not writable ({e.strerror})") from None


def check_new_files(paths: list[Path], *, overwrite: bool) -> None:
    """Refuse names that are folders, or exist without --overwrite; one line for all of them."""
    existing = [p for p in paths if p.exists() and not p.is_dir()]
    for p in paths:
        if p.is_dir():
            raise UsageError(f"output {p} is a folder")
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UsageError(f"output exists: {existing[0]}{more}; pass --overwrite to replace")


def read_mask(path: str, image: Image.Image) -> Image.Image:
    """--mask: a picture of the image's size whose region is not empty."""
    if not Path(path).exists():
        raise UsageError(f"mask not found: {path}")
    mask = open_image(path)
    if mask.size != image.size:
        raise UsageError(f"mask {path} is {mask.width}x{mask.height}, the image is {image.width}x{image.height}")
    load_mask(mask, 8 * max(1, min(image.size) // 8))   # refuses an empty mask before any work
    return mask


def parse_colour(text: str) -> tuple[float, float, float]:
    try:
        if text.startswith("#") and len(text) == 7:
            rgb = [int(text[i:i + 2], 16) for i in (1, 3, 5)]
        else:
            rgb = [int(v) for v in text.split(",")]
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise ValueError
    except ValueError:
        raise UsageError(f'--color must be "#rrggbb" or "r,g,b" with values 0-255, got {text!r}') from None
    return tuple(v / 255 for v in rgb)


def read_noise(path: str | None) -> torch.Tensor | None:
    """--noise: the one tensor of a .safetensors file (its shape is checked by Editor.invert)."""
    if path is None:
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not Path(path).is_file():
        raise UsageError(f"noise file not found: {path}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise UsageError(f"--noise {path}: not a readable .safetensors file ({type(e).__name__})") from None
    if len(tensors) != 1:
        raise UsageError(f"--noise {path}: needs exactly one tensor, holds {len(tensors)}")
    noise = next(iter(tensors.values()))
    return checks.finite_tensor(f"--noise {path}", noise if noise.is_floating_point() else noise.double())


def seeds_for(args) -> list[int]:
    first = args.seed if args.seed is not None else secrets.randbelow(2**31)
    return [first + i for i in range(getattr(args, "num_inversions", 1))]


def read_code(path: str) -> LatentCode:
    if not Path(path).is_file():
        raise UsageError(f"latent code not found: {path}")
    return LatentCode.load(path)   # checks every tensor and setting; InputError names what is wrong


def check_images(path: str, items: list[DatasetItem]) -> None:
    """`efddpm batch FILE`: each image of `items` decodes; errors name the file and the entry."""
    for item in items:
        try:
            open_image(item.image)
        except ImageError as e:
            raise ImageError(f"batch file {path}: {item.entry}: {e}") from None
