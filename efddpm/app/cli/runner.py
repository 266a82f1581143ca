"""The sequence every subcommand but batch follows, written once: run(command, args). (batch, a dataset run of
many items that records each one and may resume, has its own: efddpm.app.dataset_run.)

    1. check the settings, read and check the inputs        command(args), which returns the Plan of the rest
    2. check the output names                               before any model is loaded
    3. load the model, check what needs it                  load_editor, plan.check
    4. warn about prompts the text encoder cuts
    5. work, writing each group of outputs all or nothing   plan.work, write

Every output's metadata is assembled here (record), from the settings its command gives it.
"""
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from PIL import Image

from efddpm.core.version import VERSION
from efddpm.app.cli.inputs import check_new_files, check_output_folder
from efddpm.app.cli.parser import DTYPES, UsageError
from efddpm.app.embedded import DEFAULT_MODEL
from efddpm.app.images import png_writer
from efddpm.core import checks
from efddpm.core.atomic import Outputs
from efddpm.method.latent_code import LatentCode


@dataclass
class Output:
    """One file to write: a picture (a PNG) or a latent code (.safetensors), and the settings that made it."""
    path: Path
    result: Image.Image | LatentCode
    settings: dict


@dataclass
class Plan:
    """What a subcommand does once its settings and inputs are checked."""
    folder: Path                   # where its outputs go: must be a writable folder (or creatable)
    names: list[Path]              # every file it will write: none may be a folder, or exist without --overwrite
    prompts: list[str]             # warned about when the text encoder cuts them
    work: Callable[..., Iterable[list[Output]]]   # work(editor) yields groups of outputs, each written all or nothing
    model: str | None = None       # the model to load (regenerate: --model, else its code's); None: --model
    check: Callable | None = None  # check(editor): checks and defaults that need the model, before any work


def run(command: Callable[..., Plan], args) -> None:
    """Perform a subcommand: command(args) checks its settings and inputs and returns its Plan."""
    plan = command(args)
    check_output_folder(plan.folder)
    check_new_files(plan.names, overwrite=args.overwrite)
    editor = load_editor(args, plan.model)
    if plan.check is not None:
        plan.check(editor)
    warn_long_prompts(editor, plan.prompts)
    start = time.perf_counter()
    try:
        for group, outputs in enumerate(plan.work(editor)):
            if args.compile and group == 0:
                note(args, f"the first outputs, compiling included, took {time.perf_counter() - start:.1f} s")
            write(args, editor, outputs)
    except (MemoryError, torch.OutOfMemoryError) as e:
        raise checks.out_of_memory(e) from None


def warn_long_prompts(editor, prompts: list[str]) -> None:
    for message in editor.prompt_warnings(prompts):
        print(f"efddpm: warning: {message}", file=sys.stderr)


def load_editor(args, model: str | None = None):
    """The model (`model`, else --model, else the embedded one) on --device in --dtype; --size checked against it."""
    from efddpm.app.editor import Editor
    source = model or args.model or str(DEFAULT_MODEL)
    if not (model or args.model) and not DEFAULT_MODEL.is_file():
        raise UsageError(f"no --model given and the embedded model {DEFAULT_MODEL} is missing (a checkout has it in "
                         "weights/, pip install . in <prefix>/share/efddpm/weights); pass --model")
    device = checks.device(args.device, "--device")
    dtype_name = model_dtype(args, device)
    if dtype_name == "float16" and device.type == "cpu":
        raise UsageError("--dtype float16 needs a CUDA device (use float32 or bfloat16 on the CPU)")
    if not args.quiet and not (model or args.model):
        print(f"efddpm: using the embedded shapes model ({DEFAULT_MODEL.name}); real photos need SD1.5, "
              "e.g. --model stable-diffusion-v1-5/stable-diffusion-v1-5", file=sys.stderr)
    if args.compile and device.type != "cuda":
        raise UsageError(f"--compile needs a CUDA --device, got {device}")
    editor = Editor.from_pretrained(source, device=device, dtype=DTYPES[dtype_name])
    if args.compile:
        editor.compile()
        note(args, f"compiling the UNet (torch.compile) on its first calls: a minute or two the first time on this "
                   f"machine, ~15 s once PyTorch's cache holds it ({os.environ['TORCHINDUCTOR_CACHE_DIR']})")
    if getattr(args, "size", None) is not None:
        args.size = editor.check_size(args.size, "--size", samples=2 * max(1, len(getattr(args, "target", None) or [1])))
    return editor


def model_dtype(args, device: torch.device) -> str:
    """--dtype, else float16 on CUDA and float32 elsewhere."""
    return args.dtype or ("float16" if device.type == "cuda" else "float32")


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


def record(args, editor, settings: dict) -> dict:
    """What goes into an output's metadata: the command's settings (enough to reproduce it), under names of
    their own; the latent code's settings go under "inversion", never merged with them."""
    return {"efddpm_version": VERSION, "command": args.command, "model": editor.models.source,
            "device": str(editor.device), "model_dtype": str(editor.dtype).removeprefix("torch."), **settings}


def png_text(args, editor, settings: dict) -> dict[str, str]:
    """A PNG's text chunks: record() of its settings as the "efddpm" chunk (JSON, NaN and inf refused), and
    "Software"."""
    return {"efddpm": json.dumps(record(args, editor, settings), allow_nan=False), "Software": f"efddpm {VERSION}"}


def write(args, editor, outputs: list[Output]) -> None:
    """Write `outputs` all or nothing, each with record() of its settings: in a PNG as its text (png_text), in a
    latent code under "cli", beside the code's own settings."""
    staged = Outputs(args.overwrite)
    try:
        for output in outputs:
            if isinstance(output.result, LatentCode):
                output.result.settings["cli"] = record(args, editor, output.settings)
                staged.write(output.path, output.result.write)
            else:
                staged.write(output.path, png_writer(output.result, png_text(args, editor, output.settings)))
        for path in staged.commit():
            note(args, f"wrote {path}")
    except BaseException:
        staged.discard()
        raise
