"""The README's Prompt-to-Prompt picture, docs/p2p_example.png, on the embedded model (CPU, float32):

    input | plain edit | edit + P2P      a colour swap (row 1) and a shape swap (row 2) of one held-out picture

then the same two edits, plain and with P2P, on every held-out picture of efddpm.miniature.world (--pictures, 20 by
default), read by its pixel rules: the target colour and shape reached, and the IoU of the output's shape with the
input's. The edits are Editor.edit's defaults for this model (100 steps, source guidance 3.5, T_skip 36, the
model's own target guidance, 2.5; seed 0); P2P is P2P() (xa 0.6, sa 0.2, window "all": 60 cross- and 20
self-attention steps of the 64 run). Prints every number the README quotes.

    OMP_NUM_THREADS=1 python benchmarks/p2p_example.py                 # about 2 minutes on a 2-core CPU
    OMP_NUM_THREADS=1 python benchmarks/p2p_example.py --pictures 0    # the picture alone, ~10 s
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from efddpm import P2P, Editor
from efddpm.app.embedded import DEFAULT_MODEL
from efddpm.miniature.measure import KINDS, measure_edit
from efddpm.miniature.world import edit_targets, heldout_pictures, render

ROOT = Path(__file__).resolve().parents[1]
SHOWN = 19          # the held-out picture of the README's picture (notebooks 03 and 06 use it too)
SCALE, GAP = 2, 4   # the picture: each 64x64 panel enlarged twice (nearest), 4 grey pixels between panels


def edits(editor, picture, p2p):
    """(input, [(kind, target picture, plain image, P2P image, plain reading, P2P reading)]) for one picture."""
    image = render(picture)
    code = editor.invert(image, picture.caption, seed=0)
    targets = edit_targets(picture)                                      # (colour swap, shape swap)
    prompts = [t.caption for t in targets]
    plain, with_p2p = editor.edit(code, prompts), editor.edit(code, prompts, p2p=p2p)
    return image, [(f"{kind} swap", t, a, b, *(measure_edit(picture, t, kind, image, np.asarray(img)) for img in (a, b)))
                   for kind, t, a, b in zip(KINDS, targets, plain, with_p2p)]


def panel_grid(rows: list[list[Image.Image]]) -> Image.Image:
    size = rows[0][0].width * SCALE
    out = Image.new("RGB", (len(rows[0]) * (size + GAP) - GAP, len(rows) * (size + GAP) - GAP), (128, 128, 128))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            out.paste(img.resize((size, size), Image.NEAREST), (j * (size + GAP), i * (size + GAP)))
    return out


def hit(reading: dict) -> bool:
    """The target's colour and shape both (measure_edit: the edited attribute reached, the other kept)."""
    return reading["hit"] and reading["kept"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pictures", type=int, default=20, help="held-out pictures to measure (0: the picture only)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "p2p_example.png"))
    args = parser.parse_args()

    editor = Editor.from_pretrained(str(DEFAULT_MODEL))                    # float32, CPU
    p2p = P2P()
    cross, self_ = p2p.steps(100, 36)
    print(f"P2P(xa={p2p.xa}, sa={p2p.sa}, window={p2p.window!r}): {cross} cross-attention and {self_} "
          f"self-attention steps of the 64 run (100 steps, T_skip 36, target guidance {editor.target_guidance})")

    picture = heldout_pictures(SHOWN + 1)[SHOWN]
    image, rows = edits(editor, picture, p2p)
    panel_grid([[Image.fromarray(image), a, b] for _, _, a, b, _, _ in rows]).save(args.out)
    print(f"{args.out}: held-out picture {SHOWN}, '{picture.caption}'; rows: input | plain edit | edit + P2P")
    for kind, t, _, _, ra, rb in rows:
        print(f"  {kind} -> '{t.caption}': plain {ra['colour']} {ra['shape']}, IoU {ra['mask_iou']:.2f}; "
              f"+ P2P {rb['colour']} {rb['shape']}, IoU {rb['mask_iou']:.2f}")

    if args.pictures <= 0:
        return
    table = {("colour swap", m): [] for m in ("plain", "p2p")} | {("shape swap", m): [] for m in ("plain", "p2p")}
    misses = []
    for i, picture in enumerate(heldout_pictures(args.pictures)):
        for kind, t, _, _, ra, rb in edits(editor, picture, p2p)[1]:
            table[kind, "plain"].append((hit(ra), ra["mask_iou"]))
            table[kind, "p2p"].append((hit(rb), rb["mask_iou"]))
            misses += [f"  {i:2d} '{picture.caption}' -> '{t.caption}': {label} gives {r['colour']} {r['shape']}"
                       for label, r in (("plain", ra), ("P2P", rb)) if not hit(r)]
    print(f"\n{args.pictures} held-out pictures, seed 0 | target reached (colour and shape) | mean IoU with the input's "
          f"shape | P2P's IoU higher than the plain edit's")
    for kind in ("colour swap", "shape swap"):
        better = sum(b[1] > a[1] for a, b in zip(table[kind, "plain"], table[kind, "p2p"]))
        for method, label in (("plain", "plain edit"), ("p2p", "edit + P2P")):
            r = table[kind, method]
            print(f"  {kind:11s} {label:10s}  reached {sum(h for h, _ in r)}/{len(r)}  "
                  f"mean IoU {np.mean([v for _, v in r]):.2f}" + (f"  higher in {better}/{len(r)}" if method == "p2p"
                                                                 else ""))
    print("target missed:" if misses else "no target missed", *misses, sep="\n")


if __name__ == "__main__":
    main()
