"""The `efddpm` command: edit real images with the edit-friendly DDPM noise space.

    efddpm edit cat.png --source "a photo of a cat" --target "a photo of a dog" --out edits/
    efddpm invert cat.png --source "a photo of a cat" -o cat.safetensors
    efddpm regenerate cat.safetensors --target "a photo of a dog" --target "a photo of a lion"
    efddpm shift cat.png --source "a photo of a cat" --dx 8
    efddpm recolor cat.png --source "a photo of a cat" --mask collar.png --color "#ff0000"
    efddpm batch edits.json

Every bad input ends the command with one line on stderr and exit code 2, before anything is written.
Outputs are written atomically (a temporary file, then a rename); PNGs carry every setting in their
text metadata (key "efddpm", JSON), so any result can be reproduced.
"""
import argparse
import json
import secrets
import sys
import tempfile
import tomllib
import warnings
from pathlib import Path

import torch

from . import __version__
from .checkpoint import CheckpointError
from .images import ImageError, grid, load_image, open_image, save_png, to_pil
from .inversion import LatentCode
from .shapes import DEFAULT_MODEL

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UsageError(ValueError):
    """A bad argument or input: printed as one line, exit code 2."""


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
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--dtype", choices=list(DTYPES), help="default: float16 on CUDA, float32 on CPU")
        p.add_argument("--quiet", action="store_true", help="no progress bars or notes")

    def inversion_flags(p, with_source=True):
        if with_source:
            p.add_argument("--source", default="", help='source prompt ("" = no guidance term during inversion)')
        p.add_argument("--steps", type=int, default=100)
        p.add_argument("--cfg-src", type=float, default=3.5, help="source guidance")
        p.add_argument("--eta", type=float, default=1.0)
        p.add_argument("--seed", type=int, help="default: drawn at random and recorded in the outputs")
        p.add_argument("--size", type=int, help="image side in pixels (default: the model's, 512 for SD1.x)")

    def edit_flags(p):
        p.add_argument("--target", action="append", required=True, help="target prompt (repeatable)")
        p.add_argument("--cfg-tgt", type=float, nargs="+",
                       help="target guidance: one value, or one per target (default: 15, the paper's; 7.5 for the "
                            "embedded shapes model)")
        p.add_argument("--skip", type=int, default=36, help="T_skip: steps left out at the start")

    def output_flags(p, what):
        p.add_argument("--out", default=".", help=f"folder for the {what} (created if missing)")
        p.add_argument("--overwrite", action="store_true", help="replace existing output files")

    p = commands.add_parser("edit", help="invert an image and edit it with target prompts")
    p.add_argument("image")
    inversion_flags(p), edit_flags(p), model_flags(p), output_flags(p, "edited PNGs")
    p.add_argument("--num-inversions", type=int, default=1, help="several inversions (seeds) for diverse edits")
    p.add_argument("--grid", action="store_true", help="also write a side-by-side grid (input | edits)")
    p.set_defaults(run=run_edit)

    p = commands.add_parser("invert", help="invert an image; write its latent code (.safetensors)")
    p.add_argument("image")
    inversion_flags(p), model_flags(p)
    p.add_argument("-o", "--output", required=True, help="the latent code file, .safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing code file")
    p.set_defaults(run=run_invert)

    p = commands.add_parser("regenerate", help="edit a saved latent code with target prompts")
    p.add_argument("code", help="a .safetensors latent code written by `efddpm invert`")
    edit_flags(p), model_flags(p), output_flags(p, "PNGs")
    p.set_defaults(run=run_regenerate)

    p = commands.add_parser("shift", help="shift the noise maps of an inversion and regenerate (paper Sec. 5)")
    p.add_argument("image")
    inversion_flags(p), model_flags(p), output_flags(p, "shifted PNG")
    p.add_argument("--dx", type=int, default=0, help="latent pixels to the right (x8 image pixels on SD1.x)")
    p.add_argument("--dy", type=int, default=0, help="latent pixels down")
    p.set_defaults(run=run_shift)

    p = commands.add_parser("recolor", help="colour manipulation of a masked region (paper Sec. 5)")
    p.add_argument("image")
    inversion_flags(p), model_flags(p), output_flags(p, "recoloured PNG")
    p.add_argument("--mask", required=True, help="image of the same size as IMAGE; white = region to recolour")
    p.add_argument("--color", required=True, help='"#rrggbb" or "r,g,b" (0-255)')
    p.add_argument("--strength", type=float, default=0.2, help="s: how hard z_t is pushed towards the colour")
    p.add_argument("--t-range", type=int, nargs=2, default=[1, 40], metavar=("T1", "T2"),
                   help="the steps t (1 = last) in which z_t is pushed")
    p.set_defaults(run=run_recolor)

    p = commands.add_parser("batch", help="edit many images listed in a JSON or TOML file")
    p.add_argument("file", help='a list of {"image", "source", "targets"} (TOML: [[edit]] tables); '
                                "relative image paths are relative to the file")
    inversion_flags(p, with_source=False), model_flags(p), output_flags(p, "edited PNGs")
    p.add_argument("--cfg-tgt", type=float, help="target guidance (default: 15, the paper's; 7.5 for the embedded "
                                                 "shapes model)")
    p.add_argument("--skip", type=int, default=36, help="T_skip: steps left out at the start")
    p.set_defaults(run=run_batch)
    return parser


# ---------------------------------------------------------------------------------------------- checks

def check_settings(args) -> None:
    """Numbers that the method cannot use, refused before any work."""
    steps = args.steps
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if steps > 1000:
        raise UsageError(f"--steps must be at most 1000 (the training schedule's length), got {steps}")
    skip = getattr(args, "skip", 0)
    if not 0 <= skip < steps:
        raise UsageError(f"--skip must be in 0..{steps - 1} (less than --steps {steps}), got {skip}")
    for name in ("cfg_src", "cfg_tgt"):
        value = getattr(args, name, None)                    # a number, a list (one per target) or None (default)
        for w in value if isinstance(value, list) else [] if value is None else [value]:
            if w < 0:
                raise UsageError(f"--{name.replace('_', '-')} must not be negative, got {w}")
    if not 0.0 <= getattr(args, "eta", 1.0) <= 1.0:
        raise UsageError(f"--eta must be in [0, 1], got {args.eta}")
    if getattr(args, "num_inversions", 1) < 1:
        raise UsageError(f"--num-inversions must be at least 1, got {args.num_inversions}")
    if args.size is not None and (args.size <= 0 or args.size % 8):
        raise UsageError(f"--size must be a positive multiple of 8, got {args.size}")
    targets = getattr(args, "target", None)
    if targets is not None and args.cfg_tgt is not None and len(args.cfg_tgt) not in (1, len(targets)):
        raise UsageError(f"--cfg-tgt takes one value or one per --target ({len(targets)}), got {len(args.cfg_tgt)}")


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


def check_new_files(paths: list[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise UsageError(f"output exists: {existing[0]}" + (f" (and {len(existing) - 1} more)" if len(existing) > 1 else "")
                         + "; pass --overwrite to replace")


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


# ---------------------------------------------------------------------------------------------- running

def load_editor(args, model: str | None = None):
    from .pipeline import Editor
    source = model or args.model or str(DEFAULT_MODEL)
    if not (model or args.model) and not DEFAULT_MODEL.is_file():
        raise UsageError(f"no --model given and the embedded model {DEFAULT_MODEL} is missing (a checkout has it in "
                         "weights/, pip install . in <prefix>/share/efddpm/weights); pass --model")
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here")
    dtype_name = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    if dtype_name == "float16" and device == "cpu":
        raise UsageError("--dtype float16 needs a CUDA device (use float32 or bfloat16 on the CPU)")
    if not args.quiet and not (model or args.model):
        print(f"efddpm: using the embedded shapes model ({DEFAULT_MODEL.name}); real photos need SD1.5, "
              "e.g. --model stable-diffusion-v1-5/stable-diffusion-v1-5", file=sys.stderr)
    return Editor.from_pretrained(source, device=device, dtype=DTYPES[dtype_name])


class Progress:
    """One progress bar over the network calls of a command (tqdm, as shipped with huggingface_hub)."""

    def __init__(self, total: int, quiet: bool):
        from huggingface_hub.utils import tqdm
        self.bar = tqdm(total=total, unit="step", disable=quiet, file=sys.stderr, leave=False)

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def note(args, text: str) -> None:
    if not args.quiet:
        print(f"efddpm: {text}", file=sys.stderr)


def settings(args, editor, **extra) -> dict:
    """What goes into every output's metadata: enough to reproduce it."""
    return {"efddpm_version": __version__, "command": args.command, "model": editor.models.source,
            "device": str(editor.device), "dtype": str(editor.dtype).removeprefix("torch."), **extra}


def png_metadata(values: dict) -> dict[str, str]:
    return {"efddpm": json.dumps(values), "Software": f"efddpm {__version__}"}


def invert(args, editor, image, seed: int, progress: Progress):
    code = editor.invert(image, args.source, steps=args.steps, guidance=args.cfg_src, eta=args.eta, seed=seed,
                         size=args.size, progress=progress)
    note(args, f"{image}: {code.settings['image']}")
    return code


def edit_one(args, editor, image, source: str, targets: list[str], guidances: list[float], skip: int,
             seeds: list[int], out: Path, stem: str, make_grid: bool) -> None:
    """Invert `image` once per seed, edit with every target, write the PNGs (and the grid)."""
    names = output_names(out, stem, len(targets), seeds)
    grid_name = out / f"{stem}_grid.png"
    check_new_files(names + ([grid_name] if make_grid else []), args.overwrite)
    progress = Progress(len(seeds) * 2 * (args.steps - skip), args.quiet)  # inversion and edit: steps - skip each
    results = []
    for seed in seeds:
        code = editor.invert(image, source, steps=args.steps, guidance=args.cfg_src, eta=args.eta, seed=seed,
                             size=args.size, skip=skip, progress=progress)
        images = editor.edit(code, targets, guidance=guidances, skip=skip, progress=progress)
        for k, (target, img) in enumerate(zip(targets, images)):
            meta = settings(args, editor, image=str(image), resize=code.settings["image"], source=source,
                            target=target, cfg_src=args.cfg_src, cfg_tgt=guidances[k], steps=args.steps, skip=skip,
                            eta=args.eta, seed=seed, size=int(img.width))
            results.append((img, meta))
    progress.close()
    note(args, f"{image}: {code.settings['image']}")
    out.mkdir(parents=True, exist_ok=True)
    for name, (img, meta) in zip(names, results):
        save_png(img, name, png_metadata(meta))
        note(args, f"wrote {name}")
    if make_grid:
        pixels, _ = load_image(image, results[0][0].width)
        save_png(grid(to_pil(pixels) + [img for img, _ in results]), grid_name,
                 png_metadata({**results[0][1], "target": targets, "layout": "input | edits"}))
        note(args, f"wrote {grid_name}")


def seeds_for(args) -> list[int]:
    first = args.seed if args.seed is not None else secrets.randbelow(2**31)
    return [first + i for i in range(getattr(args, "num_inversions", 1))]


def target_guidances(cfg_tgt: float | list[float] | None, editor, n: int) -> list[float]:
    """--cfg-tgt (a number, one per target, or None: the editor's default, 15 or 7.5 for the embedded model)
    as one weight per target."""
    if cfg_tgt is None:
        cfg_tgt = editor.target_guidance
    given = cfg_tgt if isinstance(cfg_tgt, list) else [cfg_tgt]
    return given * n if len(given) == 1 else given


def output_names(out: Path, stem: str, n_targets: int, seeds: list[int]) -> list[Path]:
    """The PNG of each (seed, target): stem_k.png, or stem_k_seedS.png when there are several seeds."""
    return [out / (f"{stem}_{k + 1}.png" if len(seeds) == 1 else f"{stem}_{k + 1}_seed{s}.png")
            for s in seeds for k in range(n_targets)]


def run_edit(args) -> None:
    check_settings(args)
    open_image(args.image)  # fail on a bad image before loading any model
    check_output_folder(Path(args.out))
    editor = load_editor(args)
    check_prompts(editor, [args.source, *args.target])
    guidances = target_guidances(args.cfg_tgt, editor, len(args.target))
    edit_one(args, editor, args.image, args.source, args.target, guidances, args.skip, seeds_for(args),
             Path(args.out), Path(args.image).stem, args.grid)


def run_invert(args) -> None:
    check_settings(args)
    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise UsageError(f"-o must name a .safetensors file, got {output}")
    open_image(args.image)
    check_output_folder(output.parent)
    check_new_files([output], args.overwrite)
    editor = load_editor(args)
    check_prompts(editor, [args.source])
    progress = Progress(args.steps, args.quiet)
    code = invert(args, editor, args.image, seeds_for(args)[0], progress)
    progress.close()
    code.settings.update(settings(args, editor, image=str(args.image), cfg_src=args.cfg_src))
    output.parent.mkdir(parents=True, exist_ok=True)
    code.save(output)   # atomic
    note(args, f"wrote {output}")


def read_code(path: str) -> LatentCode:
    if not Path(path).is_file():
        raise UsageError(f"latent code not found: {path}")
    try:
        return LatentCode.load(path)
    except Exception as e:  # not a safetensors file, or not one of ours
        raise UsageError(f"not an efddpm latent code: {path} ({type(e).__name__})") from None


def run_regenerate(args) -> None:
    code = read_code(args.code)
    args.steps, args.size = code.num_steps, None  # the code's; check_settings checks --skip against them
    check_settings(args)
    out = Path(args.out)
    names = [out / f"{Path(args.code).stem}_{k + 1}.png" for k in range(len(args.target))]
    check_output_folder(out)
    check_new_files(names, args.overwrite)
    editor = load_editor(args, args.model or code.settings.get("model"))
    check_prompts(editor, args.target)
    guidances = target_guidances(args.cfg_tgt, editor, len(args.target))
    progress = Progress(code.num_steps - args.skip, args.quiet)
    images = editor.edit(code, args.target, guidance=guidances, skip=args.skip, progress=progress)
    progress.close()
    out.mkdir(parents=True, exist_ok=True)
    for k, (name, img) in enumerate(zip(names, images)):
        meta = settings(args, editor, code=str(args.code), source=code.settings.get("source_prompt", ""),
                        target=args.target[k], cfg_src=code.settings.get("guidance"), cfg_tgt=guidances[k],
                        steps=code.num_steps, skip=args.skip, eta=code.settings["eta"], seed=code.settings.get("seed"))
        save_png(img, name, png_metadata(meta))
        note(args, f"wrote {name}")


def manipulate(args, suffix: str, apply, **meta) -> None:
    """Invert args.image, then apply(editor, code, progress) -> PIL image; write <stem>_<suffix>.png."""
    out = Path(args.out)
    name = out / f"{Path(args.image).stem}_{suffix}.png"
    check_output_folder(out)
    check_new_files([name], args.overwrite)
    editor = load_editor(args)
    check_prompts(editor, [args.source])
    seed = seeds_for(args)[0]
    progress = Progress(2 * args.steps, args.quiet)
    code = invert(args, editor, args.image, seed, progress)
    img = apply(editor, code, progress)
    progress.close()
    out.mkdir(parents=True, exist_ok=True)
    save_png(img, name, png_metadata(settings(args, editor, image=str(args.image), source=args.source,
                                              cfg_src=args.cfg_src, steps=args.steps, eta=args.eta, seed=seed, **meta)))
    note(args, f"wrote {name}")


def run_shift(args) -> None:
    check_settings(args)
    open_image(args.image)
    manipulate(args, f"shift_{args.dy}_{args.dx}",
               lambda editor, code, progress: editor.shift(code, args.dy, args.dx, progress=progress),
               dx=args.dx, dy=args.dy)


def run_recolor(args) -> None:
    check_settings(args)
    colour = parse_colour(args.color)
    t1, t2 = sorted(args.t_range)
    if t1 < 1 or t2 > args.steps:
        raise UsageError(f"--t-range must lie in 1..{args.steps}, got {args.t_range}")
    if args.strength < 0:
        raise UsageError(f"--strength must not be negative, got {args.strength}")
    image = open_image(args.image)
    if not Path(args.mask).exists():
        raise UsageError(f"mask not found: {args.mask}")
    mask = open_image(args.mask)
    if mask.size != image.size:
        raise UsageError(f"mask {args.mask} is {mask.width}x{mask.height}, the image is {image.width}x{image.height}")
    manipulate(args, "recolor",
               lambda editor, code, progress: editor.recolor(code, image, mask, colour, strength=args.strength,
                                                             step_range=(t1, t2), size=args.size, progress=progress),
               mask=str(args.mask), color=args.color, strength=args.strength, t_range=[t1, t2])


def read_batch(path: Path) -> list[dict]:
    """[{image, source, targets}] from JSON (a list) or TOML ([[edit]] tables); images relative to the file."""
    if not path.is_file():
        raise UsageError(f"batch file not found: {path}")
    try:
        if path.suffix == ".toml":
            entries = tomllib.loads(path.read_text(encoding="utf-8")).get("edit")
        else:
            entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"batch file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from None
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"batch file {path} must hold a non-empty list of edits")
    for i, e in enumerate(entries):
        targets = e.get("targets") if isinstance(e, dict) else None
        if (not isinstance(e, dict) or not isinstance(e.get("image"), str) or not isinstance(e.get("source", ""), str)
                or not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets)):
            raise UsageError(f"batch file {path}: entry {i + 1} must be {{\"image\": str, \"source\": str, "
                             f"\"targets\": [str, ...]}}")
        e["image"] = str(path.parent / e["image"])
    return entries


def run_batch(args) -> None:
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
    check_new_files([name for stem, e in zip(stems, entries) for name in output_names(out, stem, len(e["targets"]),
                                                                                     [seed])], args.overwrite)
    editor = load_editor(args)
    for e in entries:
        check_prompts(editor, [e.get("source", ""), *e["targets"]])
    for stem, e in zip(stems, entries):
        edit_one(args, editor, e["image"], e.get("source", ""), e["targets"],
                 target_guidances(args.cfg_tgt, editor, len(e["targets"])), args.skip, [seed], out, stem,
                 make_grid=False)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # prompt-length warnings are printed by check_prompts
            args.run(args)
    except (UsageError, ImageError, CheckpointError) as e:
        print(f"efddpm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("efddpm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
