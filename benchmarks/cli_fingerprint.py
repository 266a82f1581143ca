"""Fingerprint of the command line's outputs on the embedded model: a refactoring that changes no behaviour keeps
every PNG byte for byte (CPU, float32, fixed seeds).

    python benchmarks/cli_fingerprint.py --save fingerprint.json     # before the change
    python benchmarks/cli_fingerprint.py --compare fingerprint.json  # after it: exit 1 on any difference

Run both with the same thread count (e.g. OMP_NUM_THREADS=1): on the CPU the number of threads changes the order
of float32 sums, hence the bits (measured: with 2 threads instead of 1, 6 of the 8 outputs differ).

Runs edit (two targets and a grid), invert + regenerate, shift, recolor and batch on the shipped picture
(docs/red_circle.png) with short step counts, in a fixed folder layout so that the paths written into the PNG
metadata are the same every time; prints the SHA-256 of each output file.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PICTURE = ROOT / "docs" / "red_circle.png"
SOURCE = "a red circle on a white background"


def run(argv: list[str]) -> None:
    from efddpm.app.cli import main
    if main([*argv, "--quiet"]) != 0:
        raise SystemExit(f"failed: efddpm {' '.join(argv)}")


def fingerprint(folder: Path) -> dict[str, str]:
    os.chdir(folder)   # relative paths: the metadata does not depend on the temporary folder's name
    shutil.copy(PICTURE, "red_circle.png")
    mask = np.asarray(Image.open("red_circle.png").convert("L")) < 200
    Image.fromarray((mask * 255).astype(np.uint8)).save("mask.png")
    run(["edit", "red_circle.png", "--source", SOURCE, "--target", "a blue circle on a white background",
         "--target", "a red square on a white background", "--grid", "--steps", "50", "--seed", "1", "--out", "edit"])
    run(["invert", "red_circle.png", "--source", SOURCE, "-o", "code.safetensors", "--steps", "50", "--seed", "2"])
    run(["regenerate", "code.safetensors", "--target", "a green circle on a white background", "--out", "regenerate"])
    run(["shift", "red_circle.png", "--source", SOURCE, "--dx", "3", "--steps", "50", "--seed", "3", "--out", "shift"])
    run(["recolor", "red_circle.png", "--source", SOURCE, "--mask", "mask.png", "--color", "#2040ff", "--steps", "50",
         "--seed", "4", "--out", "recolor"])
    Path("edits.json").write_text(json.dumps([{"image": "red_circle.png", "source": SOURCE,
                                               "targets": ["a red star on a white background"]}]))
    run(["batch", "edits.json", "--steps", "50", "--seed", "5", "--out", "batch"])
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(".").rglob("*"))
            if p.is_file() and p.suffix in (".png", ".safetensors") and p.name not in ("red_circle.png", "mask.png")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", type=Path, help="write the fingerprint (JSON) here")
    group.add_argument("--compare", type=Path, help="compare with a fingerprint written by --save")
    args = ap.parse_args()
    target = (args.save or args.compare).resolve()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        folder.mkdir()
        prints = fingerprint(folder)
        os.chdir(cwd)
    for name, digest in prints.items():
        print(f"{digest}  {name}")
    if args.save:
        target.write_text(json.dumps(prints, indent=1) + "\n")
        return 0
    before = json.loads(target.read_text())
    different = sorted(k for k in before.keys() | prints.keys() if before.get(k) != prints.get(k))
    print(f"{len(prints) - len(different)} of {len(before | prints)} outputs identical"
          + (f"; different: {', '.join(different)}" if different else ""))
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
