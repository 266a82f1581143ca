"""Edits of held-out pictures of efddpm.miniature.world, run on a model and measured by the world's pixel rules: one
home for the edit benchmark (benchmarks/edit_benchmark.py, whose table the README shows) and the embedded model's
tests (tests/test_embedded_model.py, whose thresholds assert it), so the two always measure the same thing.

    edits = EditSet(efddpm.load(DEFAULT_MODEL), world.heldout_pictures(8))   # targets: world.edit_targets
    outputs = edits.run(Setting("edit-friendly", skip=36, guidance=7.5), "colour")   # uint8 [8, 64, 64, 3]
    rows = edits.measure(outputs, "colour")                                         # one dict per picture

Each picture gets a colour edit ("a red circle ..." -> "a blue circle ...") and a shape edit ("a red circle ..." ->
"a red square ..."), by one of four methods, in NUM_STEPS steps:

    edit-friendly   Algorithm 1 (source guidance 3.5), then the target prompt from T - skip with the code's noise
    native          the native DDPM inversion (forward chain, eq. 1), same regeneration
    DDIM            DDIM inversion (source guidance 3.5), then deterministic sampling (eta 0) from T - skip
    SDEdit          the input latent noised to strength 1 - skip / NUM_STEPS (eq. 2, fresh noise), then DDPM sampling
    edit-friendly+P2P   the edit-friendly code regenerated with Prompt-to-Prompt (efddpm.method.p2p), the authors'
                    --mode p2pinv: source and target rows together, xa 0.6, sa 0.2 (fractions of all steps)
    DDIM+P2P        the DDIM code, likewise, with the authors' --mode p2pddim fractions xa 0.8, sa 0.4

Every inversion and every SDEdit run draws its noise from a fresh generator seeded by the set's seed.
An output is measured against its source picture and the target's spec:

    hit         the target was reached: the shape's colour (colour edits), the shape class (shape edits)
    kept        the other attribute did not change: the shape class (colour edits), the colour (shape edits)
    mask_iou    of the output's shape mask with the input's (colour edits: the shape should not move)
    box_iou     of the output's bounding box with the input's: position and size, whatever the shape
    shift       distance between the boxes' centres, pixels of the 64-pixel picture (NaN: no shape left)
    bg_kept     fraction of the input's background (2 px away from the shape) still background
    colour, shape   what the output shows (pixels.shape_colour, pixels.shape_class)

Shapes are told from background against the source picture's own background (world.render_background), so the
texture of the background is not mistaken for shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from efddpm.app.images import to_uint8, to_unit
from efddpm.app.networks import decode_latents, encode_pictures, encode_prompts, unet_predictor
from efddpm.checkpoint import StableDiffusionModels
from efddpm.method.inversion import ddim_inversion, edit_friendly_inversion, native_inversion, regenerate
from efddpm.method.latent_code import LatentCode
from efddpm.method.manipulations import sdedit
from efddpm.method.p2p import PromptToPrompt, defaults_for, p2p_edit
from efddpm.method.seq_align import tokenize
from efddpm.miniature import pixels, world

NUM_STEPS = 100
SOURCE_GUIDANCE = 3.5
METHODS = ("edit-friendly", "native", "DDIM", "SDEdit", "edit-friendly+P2P", "DDIM+P2P")
KINDS = ("colour", "shape")      # the edits of world.edit_targets, in its order
INVERSIONS = {"edit-friendly": edit_friendly_inversion, "native": native_inversion, "DDIM": ddim_inversion}
P2P_SETTINGS = {"edit-friendly+P2P": defaults_for("edit_friendly"),                  # the authors' runs
                "DDIM+P2P": defaults_for("ddim")}


@dataclass(frozen=True)
class Setting:
    method: str      # one of METHODS
    skip: int        # T_skip; SDEdit: NUM_STEPS - its start
    guidance: float  # target guidance

    @property
    def strength(self) -> float:
        """SDEdit's strength: the fraction of the steps it runs."""
        return 1 - self.skip / NUM_STEPS

    @property
    def label(self) -> str:
        if self.method == "SDEdit":
            return f"strength {self.strength:.1f}, w {self.guidance:g}"
        return f"skip {self.skip}, w {self.guidance:g}"


def measure_edit(source: world.Picture, target: world.Picture, kind: str, source_img: np.ndarray,
                 img: np.ndarray) -> dict:
    """The measurements (see the module's doc) of the output img of a `kind` edit ("colour" or "shape") of the
    picture `source`, drawn as source_img, towards the spec `target`. Images: uint8 [H, W, 3]."""
    background = world.render_background(source, img.shape[0])                               # uint8 [H, W, 3]
    src_mask, mask = pixels.shape_mask(source_img, background), pixels.shape_mask(img, background)
    colour, (shape, _) = pixels.shape_colour(img, mask), pixels.shape_class(mask)
    b0, b1 = pixels.box(src_mask), pixels.box(mask)
    shift = math.dist(((b0[0] + b0[2]) / 2, (b0[1] + b0[3]) / 2), ((b1[0] + b1[2]) / 2, (b1[1] + b1[3]) / 2)) \
        if b1 is not None else math.nan
    return {"hit": colour == target.colour if kind == "colour" else shape == target.shape,
            "kept": shape == source.shape if kind == "colour" else colour == source.colour,
            "mask_iou": pixels.iou(src_mask, mask), "box_iou": pixels.box_iou(b0, b1), "shift": shift,
            "bg_kept": pixels.background_kept(img, src_mask, background), "colour": colour, "shape": shape}


class EditSet:
    """Pictures, their edit targets (world.edit_targets with `seed`) and a model: the pictures encoded and every
    caption embedded once, each inversion run once (when first needed); then any setting's outputs, measured."""

    def __init__(self, models: StableDiffusionModels, pictures: list[world.Picture], *, seed: int = 0):
        self.models, self.pictures, self.seed = models, pictures, seed
        pairs = [world.edit_targets(p, seed) for p in pictures]                                # (colour, shape)
        self.targets = {kind: [pair[i] for pair in pairs] for i, kind in enumerate(KINDS)}
        self.dtype = next(models.unet.parameters()).dtype
        self.f = unet_predictor(models.unet, dtype=self.dtype)
        self.images = world.render_many(pictures)                                          # uint8 [B, H, W, 3]
        pixels = to_unit(torch.from_numpy(self.images).permute(0, 3, 1, 2))                 # [B, 3, H, W]
        self.x0 = encode_pictures(models.vae, pixels, dtype=self.dtype)                     # [B, 4, h, w]
        self.source, self.uncond = self.embed([p.caption for p in pictures]), self.embed([""])  # [B | 1, 77, width]
        self.target_embeddings = {kind: self.embed([t.caption for t in ts]) for kind, ts in self.targets.items()}
        self.codes: dict[str, LatentCode] = {}

    def embed(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.models.tokenizer, self.models.text_encoder, prompts)     # [B, 77, width]

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def code(self, method: str) -> LatentCode:
        """The pictures inverted by `method` ("edit-friendly", "native" or "DDIM") with their captions."""
        if method not in self.codes:
            kw = {} if method == "DDIM" else {"generator": self.generator()}                # DDIM draws no noise
            self.codes[method] = INVERSIONS[method](self.f, self.x0, self.source, self.uncond, SOURCE_GUIDANCE,
                                                    num_steps=NUM_STEPS, **kw)
        return self.codes[method]

    def run(self, setting: Setting, kind: str) -> np.ndarray:
        """The outputs of the `kind` edits with `setting`: uint8 [B, H, W, 3]."""
        tgt = self.target_embeddings[kind]
        if setting.method == "SDEdit":
            x = sdedit(self.f, self.x0, NUM_STEPS - setting.skip, tgt, self.uncond, setting.guidance,
                       num_steps=NUM_STEPS, generator=self.generator())                    # [B, 4, h, w]
        elif setting.method in P2P_SETTINGS:
            x = torch.cat([self.p2p(setting, kind, i) for i in range(len(self.pictures))])  # [B, 4, h, w]
        else:
            x = regenerate(self.f, self.code(setting.method), tgt, self.uncond, setting.guidance, skip=setting.skip)
        return to_uint8(decode_latents(self.models.vae, x, dtype=self.dtype)).permute(0, 2, 3, 1).cpu().numpy()

    def p2p(self, setting: Setting, kind: str, i: int) -> torch.Tensor:
        """Picture i's `kind` edit by Prompt-to-Prompt on its code (setting.method: "<inversion>+P2P"): x_0 [1, 4, h, w]."""
        code = self.code(setting.method.removesuffix("+P2P"))
        one = LatentCode(code.x_T[i:i + 1], code.zs[:, i:i + 1], code.xts[:, i:i + 1], code.timesteps, code.settings)
        tok = self.models.tokenizer
        control = PromptToPrompt(tokenize(tok, self.pictures[i].caption), [tokenize(tok, self.targets[kind][i].caption)],
                                 P2P_SETTINGS[setting.method], num_steps=NUM_STEPS, skip=setting.skip)
        with self.models.unet.controlled(control):
            x = p2p_edit(self.f, one, self.source[i:i + 1], self.target_embeddings[kind][i:i + 1], self.uncond,
                         SOURCE_GUIDANCE, setting.guidance, control=control, skip=setting.skip)   # [2, 4, h, w]
        return x[1:]                                                                             # the edit

    def measure(self, outputs: np.ndarray, kind: str) -> list[dict]:
        """measure_edit of each output (uint8 [B, H, W, 3]) of the `kind` edits, in the order of the pictures."""
        return [measure_edit(p, t, kind, src, img)
                for p, t, src, img in zip(self.pictures, self.targets[kind], self.images, outputs)]


def summarise(rows: list[dict]) -> dict:
    """The means of one setting's measurements, rows of EditSet.measure each with its "kind": {"colour_hit": ...,
    "shape_box_iou": ...} for every kind and measurement (NaN entries, e.g. the shift of an edit with no shape left,
    are left out; NaN when none is left)."""
    def mean(key, kind):
        v = [r[key] for r in rows if r["kind"] == kind and not (isinstance(r[key], float) and math.isnan(r[key]))]
        return float(np.mean(v)) if v else math.nan
    return {f"{kind}_{key}": mean(key, kind) for kind in KINDS
            for key in ("hit", "kept", "mask_iou", "box_iou", "shift", "bg_kept")}
