"""The paper's comparison in miniature, on held-out pictures of the embedded default model.

Each held-out picture (efddpm.miniature.world.heldout_pictures) gets a colour edit ("a red circle ..." -> "a blue
circle ...") and a shape edit ("a red circle ..." -> "a red square ..."), by edit-friendly inversion, native DDPM
inversion, DDIM inversion (skip 0 is the authors' DDIM baseline) and SDEdit: at the paper's defaults (T_skip 36 of
100 steps, target guidance w 15), at the model's own default guidance W0 (world.MODEL_DEFAULTS, 2.5 for the shipped
model), a sweep of T_skip (20, 36, 52 at W0) and of w (W0, 7.5, 15 at skip 36); SDEdit at strengths 0.3, 0.5, 0.7
with W0 and 15; and the paper's Sec. 3 combination, edit-friendly inversion + Prompt-to-Prompt (skip 36, w W0, 7.5
and 15; xa 0.6, sa 0.2), with the authors' DDIM + P2P baseline (skip 0; xa 0.8, sa 0.4) beside it. The edits are run and measured by efddpm.miniature.measure, as the
embedded model's tests run and measure theirs: hit (target reached), kept (the other attribute), mask IoU, box IoU,
shift (px) and bg kept, each against the input.

A second table splits the colour edits by efddpm.miniature.world.recolour_within_contrast: whether the colour change is
smaller than the shape's contrast with its background. Only then is the recoloured shape in place the picture of
the target caption nearest to the input; beyond it the nearest is a smaller shape, and a sampler that follows
the target caption is pulled that way, whatever the inversion.

    python benchmarks/edit_benchmark.py                  # 20 pictures, ~25 min on a 2-core CPU
    python benchmarks/edit_benchmark.py --pictures 4 --out /tmp/bench      # a quick look

Writes results.md (the table), results.json (every measurement), results.png (adherence vs structure)
and examples.png (input and edits of the first pictures) to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from efddpm import load
from efddpm.app.embedded import DEFAULT_MODEL
from efddpm.miniature import world
from efddpm.eval.charts import line_chart
from efddpm.miniature.measure import KINDS, METHODS, NUM_STEPS, EditSet, Setting, summarise

PAPER_GUIDANCE = 15.0
W0 = world.MODEL_DEFAULTS["target_guidance"]   # the model's own default target guidance (the shipped file's: 2.5)
SKIPS = (20, 36, 52)                           # at W0
GUIDANCES = (W0, 7.5, PAPER_GUIDANCE)          # at skip 36
SDEDIT_STRENGTHS = (0.3, 0.5, 0.7)
SDEDIT_GUIDANCES = (W0, PAPER_GUIDANCE)


def settings() -> list[Setting]:
    """The paper's default (skip 36, w 15) first, then the model's default (skip 36, W0), then the sweeps."""
    out = []
    for method in METHODS[:3]:
        out += [Setting(method, 36, PAPER_GUIDANCE), Setting(method, 36, W0)] \
            + [Setting(method, k, W0) for k in SKIPS if k != 36] \
            + [Setting(method, 36, w) for w in GUIDANCES if w not in (W0, PAPER_GUIDANCE)]
    out += [Setting("DDIM", 0, PAPER_GUIDANCE), Setting("DDIM", 0, W0)]   # the authors' DDIM baseline: all 100 steps
    out += [Setting("SDEdit", round(NUM_STEPS * (1 - s)), w) for w in SDEDIT_GUIDANCES for s in SDEDIT_STRENGTHS]
    out += [Setting("edit-friendly+P2P", 36, w) for w in GUIDANCES]          # the paper's Sec. 3 combination
    out += [Setting("DDIM+P2P", 0, PAPER_GUIDANCE), Setting("DDIM+P2P", 0, W0), Setting("DDIM+P2P", 36, W0)]
    return out


# ---------------------------------------------------------------------------------------------

def run_edits(edits: EditSet) -> dict[tuple[Setting, str], np.ndarray]:
    """Every setting on every picture: {(setting, edit kind): uint8 outputs [B, H, W, 3]} (the first edit of each
    inversion method also times its inversion)."""
    out = {}
    for s in settings():
        for kind in KINDS:
            t0 = time.perf_counter()
            out[s, kind] = edits.run(s, kind)
            print(f"  {s.method:13s} {s.label:22s} {kind:6s} {time.perf_counter() - t0:5.1f} s", flush=True)
    return out


def table(summary: dict[Setting, dict], n: int) -> str:
    head = ("| method | setting | colour: hit | colour: shape kept | colour: mask IoU | shape: hit | "
            "shape: colour kept | shape: box IoU | shift (px) | bg kept |")
    lines = [head, "|---|---|" + "---:|" * 8]
    for s, r in summary.items():
        shift = (r["colour_shift"] + r["shape_shift"]) / 2
        bg = (r["colour_bg_kept"] + r["shape_bg_kept"]) / 2
        lines.append(f"| {s.method} | {s.label} | {100 * r['colour_hit']:.0f}% | {100 * r['colour_kept']:.0f}% | "
                     f"{r['colour_mask_iou']:.2f} | {100 * r['shape_hit']:.0f}% | {100 * r['shape_kept']:.0f}% | "
                     f"{r['shape_box_iou']:.2f} | {shift:.1f} | {100 * bg:.0f}% |")
    return "\n".join(lines) + f"\n\n{n} held-out pictures, one colour edit and one shape edit each; 100 steps.\n"


def contrast_table(rows: dict[Setting, list[dict]], within: list[bool]) -> str:
    """Colour edits split by recolour_within_contrast: target reached and mask IoU on each side."""
    n_in, n_out = sum(within), len(within) - sum(within)
    lines = [f"| method | setting | within contrast (n={n_in}): hit | mask IoU | beyond contrast (n={n_out}): hit | "
             "mask IoU |", "|---|---|---:|---:|---:|---:|"]
    for s, rs in rows.items():
        colour = [r for r in rs if r["kind"] == "colour"]
        cells = []
        for side in (True, False):
            part = [r for r in colour if within[r["picture"]] == side]
            cells += [f"{100 * np.mean([r['hit'] for r in part]):.0f}%" if part else "-",
                      f"{np.mean([r['mask_iou'] for r in part]):.2f}" if part else "-"]
        lines.append(f"| {s.method} | {s.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nColour edits only, split by efddpm.miniature.world.recolour_within_contrast.\n"


def plot(summary: dict[Setting, dict]) -> Image.Image:
    """Target reached vs structure kept. Columns: colour edits (x: mask IoU), shape edits (x: box IoU).
    Rows: the guidance sweep at skip 36 (SDEdit: strengths at w 15), the T_skip sweep at W0 (SDEdit: strengths at
    W0). One line per method, each point labelled with its setting."""
    rows = (("target guidance (skip 36)",
             lambda s: s.skip == 36 if s.method != "SDEdit" else s.guidance == PAPER_GUIDANCE,
             lambda s: f"w{s.guidance:g}" if s.method != "SDEdit" else f"s{s.strength:.1f}"),
            (f"T_skip (w {W0:g})", lambda s: s.guidance == W0 and not s.method.endswith("+P2P"),
             lambda s: f"{s.skip}" if s.method != "SDEdit" else f"s{s.strength:.1f}"))
    cols = (("colour", "colour_mask_iou", "mask IoU with the input"),
            ("shape", "shape_box_iou", "bounding-box IoU with the input"))
    lowest = min(100 * r[f"{kind}_hit"] for r in summary.values() for kind in KINDS)
    y_min = min(50, 10 * int(lowest // 10))                                   # every point on the chart
    charts = []
    for sweep, keep, label in rows:
        for kind, x_key, x_name in cols:
            series, labels = {m: [] for m in METHODS}, {m: [] for m in METHODS}   # fixed order: fixed colours
            for s, r in sorted(summary.items(), key=lambda e: e[1][x_key]):
                if keep(s):
                    series[s.method].append((r[x_key], 100 * r[f"{kind}_hit"]))
                    labels[s.method].append(label(s))
            charts.append(line_chart(series, f"{kind} edits, sweep of {sweep}", x_name, "target reached (%)",
                                     markers=True, labels=labels, xlim=(0, 1.0), ylim=(y_min, 102)))
    w, h = charts[0].size
    out = Image.new("RGB", (2 * w, 2 * h), (255, 255, 255))
    for i, c in enumerate(charts):
        out.paste(c, ((i % 2) * w, (i // 2) * h))
    return out


def examples(pics, src_imgs, outputs, chosen: list[Setting], k: int = 4, scale: int = 2) -> Image.Image:
    """Rows: the first k pictures x (colour, shape); columns: input, then each chosen setting."""
    font = ImageFont.load_default()
    size = src_imgs.shape[1] * scale
    cols = 1 + len(chosen)
    img = Image.new("RGB", (cols * size, 14 + 2 * k * size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    short = {"edit-friendly": "EF", "native": "native", "DDIM": "DDIM", "SDEdit": "SDEdit", "edit-friendly+P2P": "EF+P2P",
             "DDIM+P2P": "DDIM+P2P"}
    heads = [f"{short[s.method]} " + (f"s{s.strength:.1f}" if s.method == "SDEdit" else f"k{s.skip}")
             + f" w{s.guidance:g}" for s in chosen]
    for j, s in enumerate(["input"] + heads):
        d.text((j * size + 2, 1), s, fill=(0, 0, 0), font=font)
    for i in range(min(k, len(pics))):
        for r, kind in enumerate(KINDS):
            y = 14 + (2 * i + r) * size
            tiles = [src_imgs[i]] + [outputs[s, kind][i] for s in chosen]
            for j, t in enumerate(tiles):
                img.paste(Image.fromarray(t).resize((size, size), Image.NEAREST), (j * size, y))
    return img


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--pictures", type=int, default=20)
    ap.add_argument("--device", default="cpu", help="where the model runs (float32; the noise is drawn on the CPU, so "
                    "the draws are the same everywhere)")
    ap.add_argument("--seed", type=int, default=0, help="held-out set, edit targets and inversion noise")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    pics = world.heldout_pictures(args.pictures, args.seed)
    edits = EditSet(load(args.model, device=args.device), pics, seed=args.seed)
    outputs = run_edits(edits)

    within = [world.recolour_within_contrast(p, t) for p, t in zip(pics, edits.targets["colour"])]
    rows, summary, by_setting = [], {}, {}
    for s in settings():
        rs = [{"kind": kind, "picture": i, **r} for kind in KINDS
              for i, r in enumerate(edits.measure(outputs[s, kind], kind))]
        summary[s], by_setting[s] = summarise(rs), rs
        rows += [{"method": s.method, "skip": s.skip, "guidance": s.guidance, **r} for r in rs]
    md = table(summary, len(pics)) + "\n" + contrast_table(by_setting, within)
    cmd = "python benchmarks/edit_benchmark.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    (args.out / "results.md").write_text(f"`{cmd}`\n\n{md}")
    (args.out / "results.json").write_text(json.dumps(
        {"command": cmd, "pictures": [p.__dict__ for p in pics],
         "targets": {k: [t.caption for t in v] for k, v in edits.targets.items()},
         "colour_edit_within_contrast": within,
         "summary": [{"method": s.method, "skip": s.skip, "guidance": s.guidance, **r} for s, r in summary.items()],
         "rows": rows}, indent=1))
    plot(summary).save(args.out / "results.png")
    chosen = [Setting(m, 36, w) for w in (PAPER_GUIDANCE, W0) for m in ("edit-friendly", "native", "DDIM")] \
        + [Setting("SDEdit", 50, W0), Setting("edit-friendly+P2P", 36, W0), Setting("DDIM+P2P", 0, W0)]
    examples(pics, edits.images, outputs, chosen).save(args.out / "examples.png")
    print(md)
    print(f"wrote {args.out}/results.md, results.json, results.png, examples.png; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
