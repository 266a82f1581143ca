"""The paper's comparison in miniature, on held-out pictures of the embedded default model.

Each held-out picture (efddpm.miniature.world.heldout_pictures) gets a colour edit ("a red circle ..." -> "a blue
circle ...") and a shape edit ("a red circle ..." -> "a red square ..."), by:

    edit-friendly   Algorithm 1 (w_src 3.5), then the target prompt from T - T_skip with the code's noise
    native          the native DDPM inversion (forward chain, eq. 1), same regeneration
    DDIM            DDIM inversion (w_src 3.5), then deterministic sampling (eta 0) from T - T_skip
                    (skip 0 is the authors' DDIM baseline)
    SDEdit          the input latent noised to a strength s (eq. 2, fresh noise), then DDPM sampling

with the paper's defaults (T_skip 36 of 100 steps, target guidance w 15), a sweep of T_skip (20, 36, 52 at
w 15) and of w (3.5, 7.5, 15 at skip 36); SDEdit at strengths 0.3, 0.5, 0.7 with w 7.5 and 15.
The outputs are measured by the pixel rules of efddpm.miniature.world:

    hit         the target was reached: the shape's colour (colour edits), the shape class (shape edits)
    kept        the other attribute did not change: the shape class (colour edits), the colour (shape edits)
    mask IoU    of the output's shape mask with the input's (colour edits: the shape should not move)
    box IoU     of the output's bounding box with the input's: position and size, whatever the shape
    shift       distance between the boxes' centres, pixels of the 64-pixel picture
    bg kept     fraction of the input's background (2 px away from the shape) still background

A second table splits the colour edits by efddpm.miniature.world.recolour_within_contrast: whether the colour change is
smaller than the shape's contrast with its background. Only then is the recoloured shape in place the picture of
the target caption nearest to the input; beyond it the nearest is a smaller shape, and a sampler that follows
the target caption is pulled that way, whatever the inversion.

    python benchmarks/edit_benchmark.py                  # 20 pictures, ~6 min on a 2-core CPU
    python benchmarks/edit_benchmark.py --pictures 4 --out /tmp/bench      # a quick look

Writes results.md (the table), results.json (every measurement), results.png (adherence vs structure)
and examples.png (input and edits of the first pictures) to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from efddpm import load
from efddpm.app.embedded import DEFAULT_MODEL
from efddpm.miniature import world
from efddpm.miniature.charts import line_chart
from efddpm.method.inversion import ddim_inversion, edit_friendly_inversion, native_inversion, regenerate
from efddpm.method.manipulations import sdedit

W_SRC = 3.5
SKIPS = (20, 36, 52)             # at w 15
GUIDANCES = (3.5, 7.5, 15.0)     # at skip 36
SDEDIT_STRENGTHS = (0.3, 0.5, 0.7)
SDEDIT_GUIDANCES = (7.5, 15.0)
NUM_STEPS = 100
METHODS = ("edit-friendly", "native", "DDIM", "SDEdit")


@dataclass(frozen=True)
class Setting:
    method: str      # "edit-friendly", "native", "DDIM", "SDEdit"
    skip: int        # T_skip; SDEdit: N - start
    guidance: float

    @property
    def strength(self) -> float:
        """SDEdit's strength: the fraction of the steps it runs."""
        return 1 - self.skip / NUM_STEPS

    @property
    def label(self) -> str:
        if self.method == "SDEdit":
            return f"strength {self.strength:.1f}, w {self.guidance:g}"
        return f"skip {self.skip}, w {self.guidance:g}"


def settings() -> list[Setting]:
    """The paper's default (skip 36, w 15) first, then the sweeps."""
    out = []
    for method in METHODS[:3]:
        out += [Setting(method, 36, 15.0)] + [Setting(method, k, 15.0) for k in SKIPS if k != 36] \
            + [Setting(method, 36, w) for w in GUIDANCES if w != 15.0]
    out.append(Setting("DDIM", 0, 15.0))        # the authors' DDIM baseline: all 100 steps
    out += [Setting("SDEdit", round(NUM_STEPS * (1 - s)), w) for w in SDEDIT_GUIDANCES for s in SDEDIT_STRENGTHS]
    return out


# ---------------------------------------------------------------------------------------------

class Model:
    """The library calls the benchmark needs, on a model from efddpm.load."""

    def __init__(self, path: Path):
        self.m = load(path)
        self.sf = self.m.vae.config.scaling_factor
        self.uncond = self.text([""])                                        # [1, 77, width]

    @torch.inference_mode()
    def text(self, prompts: list[str]) -> torch.Tensor:
        return self.m.text_encoder(self.m.tokenizer(prompts))               # [B, 77, width]

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> x_0 = mode * scaling_factor [B, 4, h, w]."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        return self.m.vae.encode(x).mode() * self.sf

    @torch.inference_mode()
    def decode(self, x0: torch.Tensor) -> np.ndarray:
        """x_0 [B, 4, h, w] -> uint8 [B, H, W, 3]."""
        img = self.m.vae.decode(x0 / self.sf).clamp(-1, 1)
        return ((img + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    @torch.inference_mode()
    def f(self, x, t, c):
        return self.m.unet(x, t, c)


def run_edits(model: Model, x0: torch.Tensor, src: torch.Tensor, targets: dict[str, torch.Tensor], seed: int
              ) -> dict[tuple[Setting, str], np.ndarray]:
    """Every setting on every picture: {(setting, edit kind): uint8 outputs [B, H, W, 3]}."""
    f, uncond, out = model.f, model.uncond, {}
    gen = lambda: torch.Generator().manual_seed(seed)                                  # noqa: E731
    codes = {"edit-friendly": edit_friendly_inversion(f, x0, src, uncond, W_SRC, num_steps=NUM_STEPS, generator=gen()),
             "native": native_inversion(f, x0, src, uncond, W_SRC, num_steps=NUM_STEPS, generator=gen()),
             "DDIM": ddim_inversion(f, x0, src, uncond, W_SRC, num_steps=NUM_STEPS)}
    for s in settings():
        for kind, tgt in targets.items():
            t0 = time.perf_counter()
            if s.method == "SDEdit":
                x = sdedit(f, x0, NUM_STEPS - s.skip, tgt, uncond, s.guidance, num_steps=NUM_STEPS, generator=gen())
            else:
                x = regenerate(f, codes[s.method], tgt, uncond, s.guidance, skip=s.skip)
            out[s, kind] = model.decode(x)
            print(f"  {s.method:13s} {s.label:22s} {kind:6s} {time.perf_counter() - t0:5.1f} s", flush=True)
    return out


def measure(p: world.Picture, target: world.Picture, kind: str, src_img: np.ndarray, img: np.ndarray) -> dict:
    src_mask, mask = world.shape_mask(src_img, p.background), world.shape_mask(img, p.background)
    colour, (shape, _) = world.shape_colour(img, mask), world.shape_class(mask)
    b0, b1 = world.box(src_mask), world.box(mask)
    shift = math.dist(((b0[0] + b0[2]) / 2, (b0[1] + b0[3]) / 2), ((b1[0] + b1[2]) / 2, (b1[1] + b1[3]) / 2)) \
        if b1 is not None else math.nan
    return {"hit": colour == target.colour if kind == "colour" else shape == target.shape,
            "kept": shape == p.shape if kind == "colour" else colour == p.colour,
            "mask_iou": world.iou(src_mask, mask), "box_iou": world.box_iou(b0, b1), "shift": shift,
            "bg_kept": world.background_kept(img, src_mask, p.background), "colour": colour, "shape": shape}


def summarise(rows: list[dict]) -> dict:
    def mean(key, kind):
        v = [r[key] for r in rows if r["kind"] == kind and not (isinstance(r[key], float) and math.isnan(r[key]))]
        return float(np.mean(v)) if v else math.nan
    return {f"{kind}_{key}": mean(key, kind) for kind in ("colour", "shape")
            for key in ("hit", "kept", "mask_iou", "box_iou", "shift", "bg_kept")}


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
    Rows: the guidance sweep at skip 36 (SDEdit: strengths at w 7.5), the T_skip sweep at w 15 (SDEdit:
    strengths at w 15). One line per method, each point labelled with its setting."""
    rows = (("target guidance (skip 36)", lambda s: s.skip == 36 if s.method != "SDEdit" else s.guidance == 7.5,
             lambda s: f"w{s.guidance:g}" if s.method != "SDEdit" else f"s{s.strength:.1f}"),
            ("T_skip (w 15)", lambda s: s.guidance == 15.0,
             lambda s: f"{s.skip}" if s.method != "SDEdit" else f"s{s.strength:.1f}"))
    cols = (("colour", "colour_mask_iou", "mask IoU with the input"),
            ("shape", "shape_box_iou", "bounding-box IoU with the input"))
    charts = []
    for sweep, keep, label in rows:
        for kind, x_key, x_name in cols:
            series, labels = {m: [] for m in METHODS}, {m: [] for m in METHODS}   # fixed order: fixed colours
            for s, r in sorted(summary.items(), key=lambda e: e[1][x_key]):
                if keep(s):
                    series[s.method].append((r[x_key], 100 * r[f"{kind}_hit"]))
                    labels[s.method].append(label(s))
            charts.append(line_chart(series, f"{kind} edits, sweep of {sweep}", x_name, "target reached (%)",
                                     markers=True, labels=labels, xlim=(0, 1.0), ylim=(50, 102)))
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
    short = {"edit-friendly": "EF", "native": "native", "DDIM": "DDIM", "SDEdit": "SDEdit"}
    heads = [f"{short[s.method]} " + (f"s{s.strength:.1f}" if s.method == "SDEdit" else f"k{s.skip}")
             + f" w{s.guidance:g}" for s in chosen]
    for j, s in enumerate(["input"] + heads):
        d.text((j * size + 2, 1), s, fill=(0, 0, 0), font=font)
    for i in range(min(k, len(pics))):
        for r, kind in enumerate(("colour", "shape")):
            y = 14 + (2 * i + r) * size
            tiles = [src_imgs[i]] + [outputs[s, kind][i] for s in chosen]
            for j, t in enumerate(tiles):
                img.paste(Image.fromarray(t).resize((size, size), Image.NEAREST), (j * size, y))
    return img


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--pictures", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="held-out set, edit targets and inversion noise")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    model = Model(args.model)
    pics = world.heldout_pictures(args.pictures, args.seed)
    colour_edits, shape_edits = zip(*(world.edit_targets(p, args.seed) for p in pics))
    edits = {"colour": list(colour_edits), "shape": list(shape_edits)}
    src_imgs = world.render_many(pics)
    x0 = model.encode(src_imgs)
    targets = {kind: model.text([t.caption for t in ts]) for kind, ts in edits.items()}
    outputs = run_edits(model, x0, model.text([p.caption for p in pics]), targets, args.seed)

    within = [world.recolour_within_contrast(p, t) for p, t in zip(pics, edits["colour"])]
    rows, summary, by_setting = [], {}, {}
    for s in settings():
        rs = [{"kind": kind, "picture": i, **measure(p, edits[kind][i], kind, src_imgs[i], outputs[s, kind][i])}
              for kind in ("colour", "shape") for i, p in enumerate(pics)]
        summary[s], by_setting[s] = summarise(rs), rs
        rows += [{"method": s.method, "skip": s.skip, "guidance": s.guidance, **r} for r in rs]
    md = table(summary, len(pics)) + "\n" + contrast_table(by_setting, within)
    cmd = "python benchmarks/edit_benchmark.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    (args.out / "results.md").write_text(f"`{cmd}`\n\n{md}")
    (args.out / "results.json").write_text(json.dumps(
        {"command": cmd, "pictures": [p.__dict__ for p in pics], "targets": {k: [t.caption for t in v] for k, v in edits.items()},
         "colour_edit_within_contrast": within,
         "summary": [{"method": s.method, "skip": s.skip, "guidance": s.guidance, **r} for s, r in summary.items()],
         "rows": rows}, indent=1))
    plot(summary).save(args.out / "results.png")
    chosen = [Setting(m, 36, w) for w in (15.0, 7.5) for m in ("edit-friendly", "native", "DDIM")] \
        + [Setting("SDEdit", 50, 7.5)]
    examples(pics, src_imgs, outputs, chosen).save(args.out / "examples.png")
    print(md)
    print(f"wrote {args.out}/results.md, results.json, results.png, examples.png; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
