"""The `efddpm` command: edit real images with the edit-friendly DDPM noise space.

    efddpm edit cat.png --source "a photo of a cat" --target "a photo of a dog" --out edits/
    efddpm invert cat.png --source "a photo of a cat" -o cat.safetensors
    efddpm regenerate cat.safetensors --target "a photo of a dog" --target "a photo of a lion"
    efddpm shift cat.png --source "a photo of a cat" --dx 8
    efddpm recolor cat.png --source "a photo of a cat" --mask collar.png --color "#ff0000"
    efddpm batch edits.json
    efddpm eval runs/a runs/b --out scores/         (efddpm.eval.command, passed in by efddpm.__main__)

Every command runs the same sequence (runner.run): check the numbers, read and check the inputs, check the
outputs' names, load the model, check what needs the model (picture size, shift range), warn about long prompts,
work, then write every output all or nothing (efddpm.core.atomic). A bad input ends the command with one line on
stderr and exit code 2, and nothing is written. PNGs carry every setting in their text metadata (key "efddpm",
JSON), so any result can be reproduced. `batch` is a dataset run (efddpm.app.dataset_run): the same checks first,
then its items one at a time, each item's PNGs all or nothing and listed in a manifest (manifest.jsonl) that a
rerun resumes from; an item that fails is recorded and the others go on (exit code 1 at the end); `--shard I/N`
or torchrun split the items among processes.

    parser.py    the arguments
    inputs.py    the checks before any model is loaded: numbers, input files, output names
    runner.py    the sequence, the progress bar, the outputs' metadata and all-or-nothing writing
    commands.py  the subcommands: what differs from one to the next
"""
import sys
import warnings

import torch

from efddpm.app.cli.commands import COMMANDS, batch
from efddpm.app.cli.parser import DEFAULT_DEVICE, build_parser
from efddpm.app.cli.runner import run
from efddpm.app.editor import SettingWarning
from efddpm.app.images import LargeImageWarning
from efddpm.checkpoint import CheckpointError
from efddpm.core.atomic import OutputError
from efddpm.core import checks
from efddpm.core.checks import InputError

__all__ = ["DEFAULT_DEVICE", "build_parser", "main"]


def warn_once(said: set):
    """A showwarning that prints each of efddpm's warnings as one line, once per command (an image is opened more
    than once)."""
    def show(message, *_):
        if str(message) not in said:
            said.add(str(message))
            print(f"efddpm: warning: {message}", file=sys.stderr)
    return show


def main(argv: list[str] | None = None, extra: dict | None = None) -> int:
    """Run one subcommand; its exit status. extra: subcommands of the layers above the app, name -> (add(subparsers),
    run(args) -> exit status); efddpm's entry point (efddpm.__main__) passes `eval` (efddpm.eval.command)."""
    extra = extra or {}
    try:
        args = build_parser(extra).parse_args(argv)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)       # other libraries' notes; prompt lengths: runner.run
            for ours in (LargeImageWarning, SettingWarning):
                warnings.simplefilter("always", ours)
            warnings.showwarning = warn_once(set())
            if args.command in extra:
                return extra[args.command][1](args)
            if args.command == "batch":
                return batch(args)
            run(COMMANDS[args.command], args)
    except (InputError, CheckpointError, OutputError) as e:
        print(f"efddpm: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, torch.OutOfMemoryError) as e:
        print(f"efddpm: error: {checks.out_of_memory(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"efddpm: interrupted; {str(e) or 'nothing was written'}", file=sys.stderr)
        return 130
    return 0

