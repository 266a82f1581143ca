"""The paper's trade-off (Sec. 4, Fig. 7) in miniature: `efddpm eval`'s sweep on held-out pictures of the embedded
model, measured offline: by the world's pixel rules instead of CLIP, on the background instead of LPIPS.

    python -m efddpm.miniature.tradeoff --out mini/ --pictures 8                   # the README's table and plot
    python -m efddpm.miniature.tradeoff --out mini/ --methods edit-friendly,sdedit --sweep skip=20,36,52

1. write_dataset renders held-out pictures (efddpm.miniature.world.heldout_pictures) into mini/data/: each picture,
   its colour edit and its shape edit (world.edit_targets) as a batch list (edits.json: the captions as source and
   target prompts) with a mask of the region each edit may change: the source shape, and for a shape edit the
   target's too, dilated by DILATE pixels (masks/). world.json keeps every picture's spec for the pixel rules.
2. `efddpm eval --dataset mini/data/edits.json --methods ... --sweep ...` makes the runs with efddpm batch on the
   embedded model (mini/runs/) and measures every edit:
       world_hit        1 if the edit shows the target's colour (colour edit) or shape (shape edit), else 0
                        (efddpm.miniature.measure.measure_edit: the rules the embedded model's tests use)
       world_mask_iou   IoU of the shape masks of input and edit (the shape kept in place)
       bg_psnr, bg_ssim, bg_mse   PIE-Bench's background metrics outside the mask (efddpm.eval)
   and draws world_hit against bg_psnr, one curve per method (mini/tradeoff.png, table.md).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from efddpm.app.cli.parser import Parser
from efddpm.core.checks import InputError
from efddpm.eval.command import chosen_metrics, eval_flags, evaluate, sweep_grid
from efddpm.miniature import pixels, world
from efddpm.miniature.measure import measure_edit

DILATE = 2
METRICS = "world_hit,world_mask_iou,bg_psnr,bg_ssim,bg_mse"
KINDS = ("colour", "shape")
WORLD_METRICS = ("world_hit", "world_mask_iou")     # world_metrics' names          # world.edit_targets' order: the target k = 1, 2 of each picture


def region(source: world.Picture, target: world.Picture) -> np.ndarray:
    """The pixels an edit of source towards target may change: both shapes, dilated; bool [S, S]."""
    masks = [pixels.shape_mask(world.render(p), world.render_background(p)) for p in (source, target)]
    return pixels.dilate(masks[0] | masks[1], DILATE)


def write_dataset(folder: Path, n: int, seed: int = 0) -> Path:
    """n held-out pictures, their two edits each, masks and specs in folder; the batch list's path."""
    (folder / "inputs").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    entries, specs = [], {}
    for i, picture in enumerate(world.heldout_pictures(n, seed)):
        targets = world.edit_targets(picture, seed)
        for kind, target in zip(KINDS, targets):
            item = f"p{i:02d}-{kind}"
            Image.fromarray(world.render(picture)).save(folder / "inputs" / f"{item}.png")
            Image.fromarray(region(picture, target).astype(np.uint8) * 255).save(folder / "masks" / f"{item}.png")
            entries.append({"id": item, "image": f"inputs/{item}.png", "mask": f"masks/{item}.png",
                            "source": picture.caption, "targets": [target.caption]})
            specs[item] = {"kind": kind, "source": vars(picture), "target": vars(target)}
    (folder / "world.json").write_text(json.dumps(specs, indent=1), encoding="utf-8")
    (folder / "edits.json").write_text(json.dumps(entries, indent=1), encoding="utf-8")
    return folder / "edits.json"


def world_metrics(folder: Path) -> dict:
    """world_hit and world_mask_iou of an edit of folder's dataset, by the world's pixel rules (measured once per
    edit for both)."""
    specs = json.loads((folder / "world.json").read_text(encoding="utf-8"))
    last: dict = {}                                     # the edit measured last: Scorers asks for both in a row

    def measured(edit, source, picture) -> dict:
        if last.get("edit") != (edit.edit, edit.digest):
            spec = specs[edit.item.id]
            as_hwc = lambda t: t.permute(1, 2, 0).numpy()                           # uint8 [S, S, 3]
            last.update(edit=(edit.edit, edit.digest), measured=measure_edit(
                world.Picture(**spec["source"]), world.Picture(**spec["target"]), spec["kind"], as_hwc(source),
                as_hwc(picture)))
        return last["measured"]

    return {"world_hit": lambda *a: float(measured(*a)["hit"]), "world_mask_iou": lambda *a: measured(*a)["mask_iou"]}


def main(argv: list[str] | None = None) -> int:
    """python -m efddpm.miniature.tradeoff: eval's flags, and --pictures N, --picture-seed S."""
    parser = Parser(prog="python -m efddpm.miniature.tradeoff", description="the paper's trade-off on the embedded "
                    "model's world: a sweep of efddpm eval, measured by the world's pixel rules")
    eval_flags(parser)
    parser.add_argument("--pictures", type=int, default=8, help="held-out pictures, two edits each (default: 8)")
    parser.add_argument("--picture-seed", type=int, default=0, help="which held-out pictures (default: 0)")
    try:
        args = parser.parse_args(argv)
        if args.pictures < 1:
            raise InputError("--pictures must be at least 1")
        data = Path(args.out) / "data"
        args.dataset = str(data / "edits.json")
        args.methods = args.methods or "edit-friendly,sdedit,edit-friendly+p2p"
        args.sweep = args.sweep or ["skip=20,36,52"]
        args.metrics = args.metrics or METRICS
        args.plot = args.plot if tuple(args.plot) != ("lpips", "clip") else ("bg_psnr", "world_hit")
        chosen_metrics(args, WORLD_METRICS, pie=False)             # checked before anything is written
        sweep_grid(args)
        write_dataset(data, args.pictures, args.picture_seed)
        return evaluate(args, world_metrics(data))
    except InputError as e:
        print(f"efddpm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
