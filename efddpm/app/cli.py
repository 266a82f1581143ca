"""The `efddpm` command: edit real images with the edit-friendly DDPM noise space.

    efddpm edit cat.png --source "a photo of a cat" --target "a photo of a dog" --out edits/
    efddpm invert cat.png --source "a photo of a cat" -o cat.safetensors
    efddpm regenerate cat.safetensors --target "a photo of a dog" --target "a photo of a lion"
    efddpm shift cat.png --source "a photo of a cat" --dx 8
    efddpm recolor cat.png --source "a photo of a cat" --mask collar.png --color "#ff0000"
    efddpm batch edits.json

Every command runs the same sequence: check the numbers, read and check the inputs, check the outputs' names,
load the model, check what needs the model (picture size, shift range), work, then write every output all or
nothing (efddpm.core.atomic). A bad input ends the command with one line on stderr and exit code 2, and nothing is
written. PNGs carry every setting in their text metadata (key "efddpm", JSON), so any result can be reproduced.
"""
import argparse
import contextlib
import json
import secrets
import sys
import tempfile
import tomllib
import warnings
from pathlib import Path

import torch

from efddpm import __version__
from efddpm.core import checks
from efddpm.core.atomic import OutputError, Outputs
from efddpm.checkpoint import CheckpointError
from efddpm.core.checks import InputError
from efddpm.method.defaults import ETA, SOURCE_GUIDANCE, STEPS, default_colour_range, default_skip
from efddpm.app.images import LargeImageWarning, grid, load_image, load_mask, open_image, png_writer, to_pil
from efddpm.method.inversion import LatentCode
from efddpm.method.scheduler import max_steps
from efddpm.app.embedded import DEFAULT_MODEL

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class UsageError(InputError):
    """A bad argument: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------- arguments

class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line too, exit code 2
        command = self.prog.removeprefix("efddpm").strip()
        raise UsageError(f"{command}: {message}" if command else message)


def build_parser() -> Parser:
    parser = Parser(prog="efddpm", description="Edit real images with the edit-friendly DDPM noise space (SD1.x).")
    parser.add_argument("--version", action="version", version=f"efddpm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def model_flags(p):
        p.add_argument("--model", help=f"hub id, diffusers folder or single file (default: the embedded "
                                       f"shapes model, {DEFAULT_MODEL.name}; real photos need SD1.5)")
        p.add_argument("--device", default=DEFAULT_DEVICE, help="cpu, cuda, cuda:1, ... (default: %(default)s)")
        p.add_argument("--dtype", choices=list(DTYPES), help="default: float16 on CUDA, float32 on CPU")
        p.add_argument("--quiet", action="store_true", help="no progress bars or notes")

    def inversion_flags(p, with_source=True, with_noise=False, cfg_src=SOURCE_GUIDANCE,
                        cfg_src_help="source guidance (default: %(default)s)"):
        if with_source:
            p.add_argument("--source", default="", help='source prompt ("" = no guidance term during inversion)')
        p.add_argument("--steps", type=int, default=STEPS, help="sampling steps N (default: %(default)s)")
        p.add_argument("--cfg-src", type=float, default=cfg_src, help=cfg_src_help)
        p.add_argument("--eta", type=float, default=ETA, help="DDPM eta, in (0, 1] (default: %(default)s)")
        p.add_argument("--seed", type=int, help="default: drawn at random and recorded in the outputs")
        p.add_argument("--size", type=int, help="picture side in pixels (default: the model's, 512 for SD1.x)")
        if with_noise:
            p.add_argument("--noise", help="the inversion's eps~ draws instead of a seed: a .safetensors file with one "
                                           "tensor [steps, 1, 4, h, w]")

    def edit_flags(p):
        p.add_argument("--target", action="append", required=True, help="target prompt (repeatable)")
        p.add_argument("--cfg-tgt", type=float, nargs="+",
                       help="target guidance: one value, or one per target (default: the model's, else the paper's 15; "
                            "the embedded shapes model's is 7.5)")
        p.add_argument("--skip", type=int, help="T_skip: steps left out at the start (default: 36 of 100, scaled to "
                                                "--steps)")

    def output_flags(p, what):
        p.add_argument("--out", default=".", help=f"folder for the {what}, created if missing (default: %(default)s)")
        p.add_argument("--overwrite", action="store_true", help="replace existing output files")

    p = commands.add_parser("edit", help="invert an image and edit it with target prompts")
    p.add_argument("image")
    inversion_flags(p, with_noise=True), edit_flags(p), model_flags(p), output_flags(p, "edited PNGs")
    p.add_argument("--num-inversions", type=int, default=1, help="several inversions (seeds) for diverse edits")
    p.add_argument("--grid", action="store_true", help="also write a side-by-side grid (input | edits)")
    p.set_defaults(run=run_edit)

    p = commands.add_parser("invert", help="invert an image; write its latent code (.safetensors)")
    p.add_argument("image")
    inversion_flags(p, with_noise=True), model_flags(p)
    p.add_argument("-o", "--output", required=True, help="the latent code file, .safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing code file")
    p.set_defaults(run=run_invert)

    p = commands.add_parser("regenerate", help="edit a saved latent code with target prompts")
    p.add_argument("code", help="a .safetensors latent code written by `efddpm invert`")
    edit_flags(p), model_flags(p), output_flags(p, "PNGs")
    p.set_defaults(run=run_regenerate)

    p = commands.add_parser("shift", help="the paper's image shifting: shift the noise maps of an inversion and regenerate")
    p.add_argument("image")
    inversion_flags(p), model_flags(p), output_flags(p, "shifted PNG")
    p.add_argument("--skip", type=int, help="regenerate from the shifted x_{T-skip} (default: the model's "
                                            "shift_skip_fraction of --steps, 50 of 100 for the embedded shapes "
                                            "model; else the paper's 0, from x_T)")
    p.add_argument("--dx", type=int, default=0, help="latent pixels to the right (x8 image pixels on SD1.x)")
    p.add_argument("--dy", type=int, default=0, help="latent pixels down")
    p.set_defaults(run=run_shift)

    p = commands.add_parser("recolor", help="the paper's colour manipulation of a masked region")
    p.add_argument("image")
    inversion_flags(p, cfg_src=None, cfg_src_help="source guidance of the inversion (default: the model's "
                    "colour_source_guidance, 0 for the embedded shapes model, whose captions name the colour that "
                    "the guidance holds; else the paper's 3.5)")
    model_flags(p), output_flags(p, "recoloured PNG")
    p.add_argument("--mask", required=True, help="image of the same size as IMAGE; white = region to recolour "
                                                 "(transparent = outside it)")
    p.add_argument("--color", required=True, help='"#rrggbb" or "r,g,b" (0-255)')
    p.add_argument("--strength", type=float, help="s: how hard z_t is pushed towards the colour (default: the "
                                                  "model's colour_strength, 1.0 for the embedded shapes model; else "
                                                  "the paper's 0.2)")
    p.add_argument("--t-range", type=int, nargs=2, metavar=("T1", "T2"),
                   help="the steps t (1 = last) in which z_t is pushed (default: 1..40 of 100, scaled to --steps)")
    p.set_defaults(run=run_recolor)

    p = commands.add_parser("batch", help="edit many images listed in a JSON or TOML file")
    p.add_argument("file", help='a list of {"image", "source", "targets"} (TOML: [[edit]] tables); '
                                "relative image paths are relative to the file")
    inversion_flags(p, with_source=False), model_flags(p), output_flags(p, "edited PNGs")
    p.add_argument("--cfg-tgt", type=float, help="target guidance (default: the model's, else the paper's 15)")
    p.add_argument("--skip", type=int, help="T_skip (default: 36 of 100, scaled to --steps)")
    p.set_defaults(run=run_batch)
    return parser


# ---------------------------------------------------------------------------------------------- checks

def check_settings(args) -> None:
    """The numbers, before any work: finite, in range, and consistent with each other."""
    args.steps = checks.steps(args.steps, max_steps(), "--steps")
    if getattr(args, "skip", None) is not None:
        args.skip = checks.skip(args.skip, args.steps, "--skip")
    elif args.command in ("edit", "batch"):
        args.skip = default_skip(args.steps)            # shift: the model's (load_editor)
    if args.cfg_src is not None:                         # recolor: the model's (load_editor)
        checks.guidance(args.cfg_src, "--cfg-src")
    if getattr(args, "cfg_tgt", None) is not None:
        targets = getattr(args, "target", None)
        if isinstance(args.cfg_tgt, list):
            args.cfg_tgt = checks.guidances(args.cfg_tgt, len(targets), "--cfg-tgt")
        else:
            checks.guidance(args.cfg_tgt, "--cfg-tgt")
    args.eta = checks.eta(args.eta, "--eta")
    if args.eta == 0:
        raise UsageError("--eta must be above 0: the edit-friendly inversion divides by sigma_t = eta * ...")
    count = getattr(args, "num_inversions", 1)
    checks.integer("--num-inversions", count, low=1, high=1000)
    if args.seed is not None:
        checks.seed(args.seed, "--seed", count)
    if args.size is not None:
        checks.integer("--size", args.size, low=8)
    if getattr(args, "noise", None) and count > 1:
        raise UsageError("--noise gives the draws of one inversion; it cannot be combined with --num-inversions")


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


def check_new_files(outputs: Outputs, paths: list[Path], hint: str = "") -> None:
    """Refuse names that are folders, or exist without --overwrite; one line for all of them."""
    existing = [p for p in paths if p.exists() and not p.is_dir()]
    for p in paths:
        if p.is_dir():
            raise UsageError(f"output {p} is a folder")
    if existing and not outputs.overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UsageError(f"output exists: {existing[0]}{more}; {hint or 'pass --overwrite to replace'}")


def check_prompts(editor, prompts: list[str]) -> None:
    for message in editor.prompt_warnings(prompts):
        print(f"efddpm: warning: {message}", file=sys.stderr)


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
    return checks.finite_tensor(f"--noise {path}", next(iter(tensors.values())).float())


# ---------------------------------------------------------------------------------------------- running

def load_editor(args, model: str | None = None):
    from efddpm.app.editor import Editor
    source = model or args.model or str(DEFAULT_MODEL)
    if not (model or args.model) and not DEFAULT_MODEL.is_file():
        raise UsageError(f"no --model given and the embedded model {DEFAULT_MODEL} is missing (a checkout has it in "
                         "weights/, pip install . in <prefix>/share/efddpm/weights); pass --model")
    device = checks.device(args.device, "--device")
    dtype_name = args.dtype or ("float16" if device.type == "cuda" else "float32")
    if dtype_name == "float16" and device.type == "cpu":
        raise UsageError("--dtype float16 needs a CUDA device (use float32 or bfloat16 on the CPU)")
    if not args.quiet and not (model or args.model):
        print(f"efddpm: using the embedded shapes model ({DEFAULT_MODEL.name}); real photos need SD1.5, "
              "e.g. --model stable-diffusion-v1-5/stable-diffusion-v1-5", file=sys.stderr)
    editor = Editor.from_pretrained(source, device=device, dtype=DTYPES[dtype_name])
    if args.command == "shift" and args.skip is None:
        args.skip = editor.shift_skip(args.steps)
    if args.command == "recolor" and args.cfg_src is None:
        args.cfg_src = editor.colour_source_guidance
    if getattr(args, "size", None) is not None:
        args.size = editor.check_size(args.size, "--size", samples=2 * max(1, len(getattr(args, "target", None) or [1])))
    return editor


class Progress:
    """One progress bar over the network calls of a command (tqdm, as shipped with huggingface_hub); as a
    context manager it clears its line on the way out, so messages after it start on a line of their own."""

    def __init__(self, total: int, quiet: bool):
        from huggingface_hub.utils import tqdm
        self.bar = tqdm(total=total, unit="step", disable=quiet, file=sys.stderr, leave=False)

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def note(args, text: str) -> None:
    if not args.quiet:
        print(f"efddpm: {text}", file=sys.stderr)


def record(args, editor, **values) -> dict:
    """What goes into an output's metadata: the command's settings (enough to reproduce it), under names of
    their own; the latent code's settings go under "inversion", never merged with them."""
    return {"efddpm_version": __version__, "command": args.command, "model": editor.models.source,
            "device": str(editor.device), "model_dtype": str(editor.dtype).removeprefix("torch."), **values}


def png(img, values: dict):
    """A writer of `img` as a PNG whose "efddpm" text chunk is `values` as JSON (NaN and inf refused)."""
    return png_writer(img, {"efddpm": json.dumps(values, allow_nan=False), "Software": f"efddpm {__version__}"})


def seeds_for(args) -> list[int]:
    first = args.seed if args.seed is not None else secrets.randbelow(2**31)
    return [first + i for i in range(getattr(args, "num_inversions", 1))]


def output_names(out: Path, stem: str, n_targets: int, seeds: list[int]) -> list[Path]:
    """The PNG of each (seed, target): stem_k.png, or stem_k_seedS.png when there are several seeds."""
    return [out / (f"{stem}_{k + 1}.png" if len(seeds) == 1 else f"{stem}_{k + 1}_seed{s}.png")
            for s in seeds for k in range(n_targets)]


def edit_one(args, editor, outputs: Outputs, image, source: str, targets: list[str], guidances: list[float],
             seeds: list[int], out: Path, stem: str, make_grid: bool, noise=None) -> None:
    """Invert `image` once per seed, edit with every target; stage the PNGs (and the grid) in `outputs`."""
    names = output_names(out, stem, len(targets), seeds)
    results, inversions = [], []
    with Progress(len(seeds) * 2 * (args.steps - args.skip), args.quiet) as progress:
        for seed in seeds:   # inversion and edit: steps - skip network calls each
            code = editor.invert(image, source, steps=args.steps, guidance=args.cfg_src, eta=args.eta,
                                 seed=None if noise is not None else seed, noise=noise, size=args.size,
                                 skip=args.skip, progress=progress)
            images = editor.edit(code, targets, guidance=guidances, skip=args.skip, progress=progress)
            inversions.append(code.settings)
            for target, guidance, img in zip(targets, guidances, images):
                results.append((img, record(args, editor, image=str(image), resize=code.settings["image"],
                                            source=source, target=target, cfg_src=args.cfg_src, cfg_tgt=guidance,
                                            steps=args.steps, skip=args.skip, eta=args.eta, seed=code.settings["seed"],
                                            size=int(img.width), inversion=code.settings)))
    note(args, f"{image}: {code.settings['image']}")
    for name, (img, meta) in zip(names, results):
        outputs.write(name, png(img, meta))
    if make_grid:
        pixels, _ = load_image(image, results[0][0].width)
        tiles = [meta for _, meta in results]
        outputs.write(out / f"{stem}_grid.png", png(grid(to_pil(pixels) + [img for img, _ in results]), {
            **{k: v for k, v in results[0][1].items() if k not in ("target", "cfg_tgt", "seed", "inversion")},
            "layout": "input | edits, seed by seed, targets in order",
            "tiles": [{k: m[k] for k in ("seed", "target", "cfg_tgt")} for m in tiles], "inversions": inversions}))


def target_guidances(cfg_tgt: float | list[float] | None, editor, n: int) -> list[float]:
    """--cfg-tgt (a number, one per target, or None: the model's default) as one weight per target."""
    return checks.guidances(editor.target_guidance if cfg_tgt is None else cfg_tgt, n, "--cfg-tgt")


@contextlib.contextmanager
def writing(args, outputs: Outputs):
    """Stage a command's outputs; on success move them all into place, on any failure remove them all."""
    try:
        yield outputs
        for path in outputs.commit():
            note(args, f"wrote {path}")
    except BaseException:
        outputs.discard()
        raise


def run_edit(args) -> None:
    check_settings(args)
    open_image(args.image)  # fail on a bad image before loading any model
    noise = read_noise(args.noise)
    out, stem, seeds = Path(args.out), Path(args.image).stem, seeds_for(args)
    check_output_folder(out)
    outputs = Outputs(args.overwrite)
    check_new_files(outputs, output_names(out, stem, len(args.target), seeds)
                    + ([out / f"{stem}_grid.png"] if args.grid else []))
    editor = load_editor(args)
    check_prompts(editor, [args.source, *args.target])
    guidances = target_guidances(args.cfg_tgt, editor, len(args.target))
    with writing(args, outputs):
        edit_one(args, editor, outputs, args.image, args.source, args.target, guidances, seeds, out, stem, args.grid,
                 noise)


def run_invert(args) -> None:
    check_settings(args)
    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise UsageError(f"-o must name a .safetensors file, got {output}")
    open_image(args.image)
    noise = read_noise(args.noise)
    check_output_folder(output.parent)
    outputs = Outputs(args.overwrite)
    check_new_files(outputs, [output])
    editor = load_editor(args)
    check_prompts(editor, [args.source])
    with Progress(args.steps, args.quiet) as progress:
        code = editor.invert(args.image, args.source, steps=args.steps, guidance=args.cfg_src, eta=args.eta,
                             seed=None if noise is not None else seeds_for(args)[0], noise=noise, size=args.size,
                             progress=progress)
    note(args, f"{args.image}: {code.settings['image']}")
    code.settings["cli"] = record(args, editor, image=str(args.image))   # beside the code's own settings
    with writing(args, outputs):
        outputs.write(output, code.write)


def read_code(path: str) -> LatentCode:
    if not Path(path).is_file():
        raise UsageError(f"latent code not found: {path}")
    return LatentCode.load(path)   # checks every tensor and setting; InputError names what is wrong


def run_regenerate(args) -> None:
    code = read_code(args.code)
    n = code.num_steps
    args.skip = checks.skip(default_skip(n) if args.skip is None else args.skip, n, "--skip",
                            inverted_skip=code.settings["skip"])
    if args.cfg_tgt is not None:
        args.cfg_tgt = checks.guidances(args.cfg_tgt, len(args.target), "--cfg-tgt")
    model = args.model or code.settings.get("model")
    if not isinstance(model, str) or not model:
        raise UsageError(f"{args.code} does not name its model; pass --model")
    out = Path(args.out)
    names = [out / f"{Path(args.code).stem}_{k + 1}.png" for k in range(len(args.target))]
    check_output_folder(out)
    outputs = Outputs(args.overwrite)
    check_new_files(outputs, names)
    editor = load_editor(args, model)
    check_prompts(editor, args.target)
    guidances = target_guidances(args.cfg_tgt, editor, len(args.target))
    with Progress(n - args.skip, args.quiet) as progress:
        images = editor.edit(code, args.target, guidance=guidances, skip=args.skip, progress=progress)
    with writing(args, outputs):
        for name, target, guidance, img in zip(names, args.target, guidances, images):
            outputs.write(name, png(img, record(args, editor, code=str(args.code),
                                                source=code.settings.get("source_prompt"), target=target,
                                                cfg_tgt=guidance, skip=args.skip, inversion=code.settings)))


def manipulate(args, suffix: str, apply, before=None, **values) -> None:
    """Invert args.image, then apply(editor, code, progress) -> (PIL image, settings used); write
    <stem>_<suffix>.png. before(editor): checks that need the model, run before any work."""
    out = Path(args.out)
    name = out / f"{Path(args.image).stem}_{suffix}.png"
    check_output_folder(out)
    outputs = Outputs(args.overwrite)
    check_new_files(outputs, [name])
    editor = load_editor(args)
    if before is not None:
        before(editor)
    check_prompts(editor, [args.source])
    seed = seeds_for(args)[0]
    skip = getattr(args, "skip", None) or 0   # shift: the code serves a regeneration from x_{T-skip}
    with Progress(2 * (args.steps - skip), args.quiet) as progress:
        code = editor.invert(args.image, args.source, steps=args.steps, guidance=args.cfg_src, eta=args.eta,
                             seed=seed, size=args.size, skip=skip, progress=progress)
        note(args, f"{args.image}: {code.settings['image']}")
        img, used = apply(editor, code, progress)
    with writing(args, outputs):
        outputs.write(name, png(img, record(args, editor, image=str(args.image), source=args.source,
                                            cfg_src=args.cfg_src, steps=args.steps, eta=args.eta, seed=seed,
                                            **values, **used, inversion=code.settings)))


def run_shift(args) -> None:
    check_settings(args)
    checks.integer("--dx", args.dx), checks.integer("--dy", args.dy)
    open_image(args.image)

    def before(editor):
        side = editor.latent_side(args.size)
        checks.shift(args.dy, args.dx, (side, side), ("--dy", "--dx"))

    def apply(editor, code, progress):
        return editor.shift(code, args.dy, args.dx, skip=args.skip, progress=progress), {"skip": args.skip}
    manipulate(args, f"shift_{args.dy}_{args.dx}", apply, before, dx=args.dx, dy=args.dy)


def run_recolor(args) -> None:
    check_settings(args)
    colour = parse_colour(args.color)
    step_range = checks.step_range(default_colour_range(args.steps) if args.t_range is None else args.t_range,
                                   args.steps, "--t-range")
    if args.strength is not None:
        checks.strength(args.strength, "--strength")
    image = open_image(args.image)
    if not Path(args.mask).exists():
        raise UsageError(f"mask not found: {args.mask}")
    mask = open_image(args.mask)
    if mask.size != image.size:
        raise UsageError(f"mask {args.mask} is {mask.width}x{mask.height}, the image is {image.width}x{image.height}")
    load_mask(mask, 8 * max(1, min(image.size) // 8))   # refuses an empty mask before any work

    def apply(editor, code, progress):
        strength = editor.colour_strength if args.strength is None else args.strength
        img = editor.recolor(code, image, mask, colour, strength=strength, step_range=step_range, size=args.size,
                             progress=progress)
        return img, {"strength": strength}
    manipulate(args, "recolor", apply, mask=str(args.mask), color=args.color, t_range=list(step_range))


BATCH_KEYS = ("image", "source", "targets")


def read_batch(path: Path) -> list[dict]:
    """[{image, source, targets}] from JSON (a list) or TOML ([[edit]] tables); images relative to the file."""
    if not path.is_file():
        raise UsageError(f"batch file not found: {path}")
    if path.suffix not in (".json", ".toml"):
        raise UsageError(f"batch file {path}: unknown type {path.suffix or '(no suffix)'!r}; write it as .json "
                         "(a list of edits) or .toml ([[edit]] tables)")
    try:
        text = path.read_text(encoding="utf-8")
        entries = tomllib.loads(text).get("edit") if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"batch file {path} is not valid {path.suffix.lstrip('.').upper()}: {e}") from None
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"batch file {path} must hold a non-empty list of edits")
    for i, e in enumerate(entries, 1):
        if isinstance(e, dict) and (unknown := sorted(set(e) - set(BATCH_KEYS))):
            raise UsageError(f"batch file {path}: entry {i} has unknown key {unknown[0]!r} (known: "
                             f"{', '.join(BATCH_KEYS)})")
        targets = e.get("targets") if isinstance(e, dict) else None
        if (not isinstance(e, dict) or not isinstance(e.get("image"), str) or not isinstance(e.get("source", ""), str)
                or not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets)):
            raise UsageError(f"batch file {path}: entry {i} must be {{\"image\": str, \"source\": str, "
                             f"\"targets\": [str, ...]}}")
        e["image"] = str(path.parent / e["image"])
    return entries


def run_batch(args) -> None:
    """Each entry's PNGs are written all or nothing when the entry is done; finished entries stay if a later one
    fails or the run is interrupted."""
    check_settings(args)
    entries = read_batch(Path(args.file))
    stems = [Path(e["image"]).stem for e in entries]
    if len(set(stems)) != len(stems):
        raise UsageError(f"batch file {args.file}: two images share a file name, their outputs would collide")
    for e in entries:
        open_image(e["image"])
    out = Path(args.out)
    check_output_folder(out)
    seed = seeds_for(args)[0]
    names = [name for stem, e in zip(stems, entries) for name in output_names(out, stem, len(e["targets"]), [seed])]
    check_new_files(Outputs(args.overwrite), names,
                    hint="an earlier run of this batch may have finished these entries: pass --overwrite to redo "
                         "them, or remove the finished entries from the batch file")
    editor = load_editor(args)
    for e in entries:
        check_prompts(editor, [e.get("source", ""), *e["targets"]])
    guidances = [target_guidances(args.cfg_tgt, editor, len(e["targets"])) for e in entries]
    for done, (stem, e, g) in enumerate(zip(stems, entries, guidances)):
        try:
            with writing(args, Outputs(args.overwrite)) as outputs:
                edit_one(args, editor, outputs, e["image"], e.get("source", ""), e["targets"], g, [seed], out, stem,
                         make_grid=False)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"{done} of {len(entries)} entries were finished and written; rerunning "
                                    "the batch refuses their outputs unless --overwrite") from None


def warn_once(message, *_, said: set = set()) -> None:
    """Warnings as one line each, each said once per process (an image is opened more than once)."""
    if str(message) not in said:
        said.add(str(message))
        print(f"efddpm: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # prompt-length warnings are printed by check_prompts
            warnings.simplefilter("always", LargeImageWarning)
            warnings.showwarning = warn_once
            args.run(args)
    except (InputError, CheckpointError, OutputError) as e:
        print(f"efddpm: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, torch.OutOfMemoryError) as e:
        print(f"efddpm: error: out of memory ({str(e).splitlines()[0] if str(e) else 'MemoryError'}); try a smaller "
              "--size or another --device; nothing was written", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"efddpm: interrupted; {str(e) or 'nothing was written'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
