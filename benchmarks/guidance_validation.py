"""Choosing the embedded model's default target guidance on a validation set, never on the test set: held-out
pictures of the seed-1 stream (the edit benchmark and the tests use seed 0), one colour edit and one shape edit
each, edit-friendly inversion (source guidance 3.5), skip 36 of 100 steps, a sweep of the target guidance. The
edits are run and measured by efddpm.miniature.measure, as the benchmark's are.

    python benchmarks/guidance_validation.py                          # the shipped model, ~4 min on a 2-core CPU
    python benchmarks/guidance_validation.py --model /tmp/m.safetensors --device cuda

The rule the model card states: the smallest guidance of the sweep at which every colour and every shape edit
reached its target (above it, the shapes move more); the file then carries it (efddpm.miniature.world.MODEL_DEFAULTS).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from efddpm import load
from efddpm.app.embedded import DEFAULT_MODEL
from efddpm.miniature import world
from efddpm.miniature.measure import KINDS, EditSet, Setting, summarise

GUIDANCES = (2.5, 3.5, 5.0, 7.5, 10.0)
VALIDATION_SEED = 1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--pictures", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    edits = EditSet(load(args.model, device=args.device),
                    world.heldout_pictures(args.pictures, VALIDATION_SEED), seed=VALIDATION_SEED)
    rows = []
    print("| target guidance | colour: hit | colour: mask IoU | shape: hit | shape: box IoU | shape: background kept |")
    print("|---:|---:|---:|---:|---:|---:|")
    for w in GUIDANCES:
        setting = Setting("edit-friendly", 36, w)
        measured = [{"kind": kind, **r} for kind in KINDS for r in edits.measure(edits.run(setting, kind), kind)]
        row = {"guidance": w, **summarise(measured)}
        rows.append(row)
        print(f"| {w:g} | {100 * row['colour_hit']:.0f}% | {row['colour_mask_iou']:.2f} | {100 * row['shape_hit']:.0f}% "
              f"| {row['shape_box_iou']:.2f} | {100 * row['shape_bg_kept']:.0f}% |", flush=True)
    every = [r["guidance"] for r in rows if r["colour_hit"] == 1.0 and r["shape_hit"] == 1.0]
    print(f"smallest guidance reaching every target: {min(every) if every else 'none'}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "pictures": args.pictures,
                                         "seed": VALIDATION_SEED, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
