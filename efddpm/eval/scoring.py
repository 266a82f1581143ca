"""The metrics `efddpm eval` can compute, by name, and the networks they need, loaded once before any work.

    name                 what                                                        needs
    clip                 CLIP score of the edit to its target prompt (the paper's    CLIP (--clip)
                         y-axis; PIE-Bench's "CLIP similarity, whole")
    clip_edited          the same on the edited region (edit x region)               CLIP, a region
    lpips                LPIPS of the edit to its input (the paper's x-axis)         LPIPS (--lpips-net)
    structure_distance   PIE-Bench's DINO ViT-B/8 self-similarity distance           DINO (--dino)
    bg_psnr, bg_mse,     PIE-Bench's background metrics: on the unedited region      a region (bg_lpips:
    bg_ssim, bg_lpips    (1 - region), both pictures masked as PnPInversion does     LPIPS squeeze, as PIE)
    psnr, mse, ssim      the same on the whole picture                               nothing

The definitions, references and weights are in docs/evaluation.md and the modules they name. PIE_BENCH is the set
PIE-Bench's table reports, PAPER the paper's trade-off (Sec. 4). A metric that needs a region is NaN for an edit
without one (the table counts those apart). Networks are loaded by Scorers.load before the first edit is read, so
a missing library or missing weights stop the command at once, with one line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from efddpm.core.checks import InputError
from efddpm.eval.background import background_scores
from efddpm.eval.clip_score import DEFAULT_CLIP, CLIPScorer
from efddpm.eval.lpips import LPIPS
from efddpm.eval.structure import StructureDistance

METRICS = ("clip", "clip_edited", "lpips", "structure_distance", "bg_psnr", "bg_lpips", "bg_mse", "bg_ssim",
           "psnr", "mse", "ssim")
PIE_BENCH = ("structure_distance", "bg_psnr", "bg_lpips", "bg_mse", "bg_ssim", "clip", "clip_edited")
PAPER = ("clip", "lpips")
NEEDS_REGION = ("clip_edited", "bg_psnr", "bg_lpips", "bg_mse", "bg_ssim")
NEEDS_PROMPT = ("clip", "clip_edited")
BACKGROUND_LPIPS_NET = "squeeze"     # PIE-Bench's choice for the background LPIPS


def metric_names(text: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """--metrics: names separated by commas, each once, or "pie-bench" / "paper" for those sets; extra: the names
    of a caller's own metrics (Scorers' extra)."""
    names, known = [], METRICS + tuple(extra)
    for name in (n.strip() for n in text.split(",")):
        group = {"pie-bench": PIE_BENCH, "paper": PAPER}.get(name, (name,))
        for metric in group:
            if metric not in known:
                raise InputError(f"--metrics: unknown metric {metric!r} (known: {', '.join(known)}, or pie-bench, "
                                 "paper)")
            if metric not in names:
                names.append(metric)
    if not names:
        raise InputError("--metrics: name at least one metric")
    return tuple(names)


@dataclass
class Weights:
    """Where the networks come from (None: the library's usual place, see docs/evaluation.md)."""
    clip: str = DEFAULT_CLIP           # hub id or local folder of a CLIP model (transformers' layout)
    lpips_net: str = "alex"            # the lpips metric's backbone: alex, vgg or squeeze
    lpips_backbone: str | None = None  # a torchvision checkpoint file of that backbone
    lpips_heads: str | None = None     # LPIPS' linear heads (.pth)
    dino: str | None = None            # DINO ViT-B/8 weights (.pth or .safetensors)


Extra = dict[str, Callable[..., float]]   # a caller's own metrics: name -> f(edit, source, picture), see Scorers


class Scorers:
    """The loaded networks of a set of metrics, and the scores of one edit. extra: metrics of the caller's own
    (e.g. the embedded world's pixel rules, efddpm.miniature.tradeoff), name -> f(edit, source, picture) -> float,
    edit the efddpm.eval.runs.Edit, source and picture uint8 [3, S, S]."""

    def __init__(self, metrics: tuple[str, ...], weights: Weights, nets: dict, extra: Extra | None = None):
        self.metrics, self.weights, self.nets, self.extra = metrics, weights, nets, extra or {}

    @classmethod
    def load(cls, metrics: tuple[str, ...], weights: Weights, device: str | torch.device = "cpu",
             extra: Extra | None = None) -> "Scorers":
        nets = {}
        if {"clip", "clip_edited"} & set(metrics):
            nets["clip"] = CLIPScorer.load(weights.clip, device)
        if "lpips" in metrics:
            nets["lpips"] = LPIPS.load(weights.lpips_net, backbone=weights.lpips_backbone, heads=weights.lpips_heads,
                                       device=device)
        if "bg_lpips" in metrics:
            same = weights.lpips_net == BACKGROUND_LPIPS_NET and "lpips" in nets
            nets["bg_lpips"] = nets["lpips"] if same else LPIPS.load(BACKGROUND_LPIPS_NET, device=device)
        if "structure_distance" in metrics:
            nets["structure_distance"] = StructureDistance.load(weights.dino, device)
        return cls(metrics, weights, nets, extra)

    def config(self) -> dict[str, str]:
        """What each metric's value depends on besides the pictures: scores are reused only where it is the same."""
        w = self.weights
        lpips = f"lpips {w.lpips_net} backbone {w.lpips_backbone or 'hub cache'} heads {w.lpips_heads or 'packaged'}"
        own = {"clip": f"clip {w.clip}", "clip_edited": f"clip {w.clip}", "lpips": lpips,
               "bg_lpips": f"lpips {BACKGROUND_LPIPS_NET}" if w.lpips_net != BACKGROUND_LPIPS_NET else lpips,
               "structure_distance": f"dino {w.dino or 'hub cache'}"}
        return {m: own.get(m, m) for m in self.metrics}

    @torch.no_grad()
    def score(self, source: torch.Tensor, edit: torch.Tensor, target: str | None, region: torch.Tensor | None,
              metrics: tuple[str, ...], about=None) -> dict[str, float]:
        """The named metrics of one edit: source and edit uint8 [3, S, S]; region the edited one, float [S, S];
        about: the efddpm.eval.runs.Edit, for the extra metrics."""
        out = {}
        background = None if region is None else 1 - region                     # [S, S], the unedited region
        if {"bg_psnr", "bg_mse", "bg_ssim"} & set(metrics) and background is not None:
            out.update({f"bg_{k}": v for k, v in background_scores(source, edit, background).items()})
        if {"psnr", "mse", "ssim"} & set(metrics):
            out.update(background_scores(source, edit, torch.ones(edit.shape[1:])))
        for m in metrics:
            if m in out:
                continue
            if m in self.extra:
                out[m] = float(self.extra[m](about, source, edit))
            elif (m in NEEDS_REGION and region is None) or (m in NEEDS_PROMPT and target is None):
                out[m] = math.nan
            elif m == "clip":
                out[m] = float(self.nets["clip"]([edit], [target])[0])
            elif m == "clip_edited":
                out[m] = float(self.nets["clip"].on_region([edit], [target], [region])[0])
            elif m == "lpips":
                out[m] = self.nets["lpips"](source, edit)
            elif m == "bg_lpips":
                out[m] = self.nets["bg_lpips"].on_region(source, edit, background)
            elif m == "structure_distance":
                out[m] = self.nets["structure_distance"](source, edit)
        return {m: out[m] for m in metrics}
