"""Prompt-to-Prompt (Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention Control", ICLR 2023) on a
latent code: the paper's Sec. 3 combination of edit-friendly inversion with a DDIM-based editing method.

The source row (the source prompt and guidance) and the target rows (the targets' prompts and guidances) are
regenerated together, in one guided batch, from the same x_{T-skip} with the same noise maps z_t (the authors'
main_run.py --mode p2pinv). The source row replays the inversion, so it gives back the input, and its attention
maps are injected into the target rows (P2P's Algorithm 1, with the code's z_t in place of fresh noise):

    cross-attention    during the first cross_steps steps every target token's map comes from the source's:
                       word swap (equally many words)    M*_t <- M_t through seq_align.replacement_mapper
                       adding a phrase (otherwise)       (M*_t)_ij <- (M_t)_{i,A(j)} where A(j) exists
                       re-weighting                      then the maps of chosen target words scaled by c
    self-attention     during the first self_steps steps, in the layers of at most 256 keys (16x16 pixels), the
                       target rows take the source row's maps whole
    local blend        after every step, x_t of a target row = x_src + mask (x_t - x_src); the mask from the blend
                       words' cross-attention maps (summed over the steps so far), in the source or the target

Only the conditional half of the guided batch is edited (the authors run the unconditional pass apart, unedited).
The choice of word swap or phrase addition, the step windows and the blend follow google/prompt-to-prompt's classes
as the authors vendor them; efddpm.method.seq_align has the token bookkeeping.

Step windows, counted from the first step regenerated (the skip point). window="all" (the authors' and
PnPInversion's runs): fractions of all N steps, cross_steps = int(xa (N + 1)) (the reference's table of N + 1 rows)
and self_steps = int(sa N); so at N 100, skip 36, xa 0.6: 60 of the 64 steps run. window="run": fractions of the
N - skip steps run, the same formulas with N - skip for N. At skip 0 the two agree.

The controller reaches the UNet through its attention-control API (efddpm.nets.attention_control): the caller sets
it, `with unet.controlled(control): p2p_edit(f, code, ..., control=control)`, and p2p_edit refuses to finish a step
the controller never saw (the silent no-op of the reference code on newer diffusers).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from efddpm.core.checks import P2P_WINDOWS, words_of
from efddpm.method.defaults import (P2P_CROSS_FRACTION, P2P_DDIM_CROSS_FRACTION, P2P_DDIM_SELF_FRACTION,
                                     P2P_SELF_FRACTION)
from efddpm.method.inversion import regenerate
from efddpm.method.latent_code import LatentCode
from efddpm.method.network import NoisePredictor
from efddpm.method.seq_align import Tokens, equalizer, refinement_mapper, replacement_mapper, word_positions

SELF_MAX_KEYS = 16 * 16    # self-attention is replaced only in layers of at most this many keys (the reference's)
BLEND_THRESHOLD = 0.3      # the local blend keeps a pixel where the normalised map exceeds this (the reference's)
BLEND_POOL = 1             # the map is max-pooled over (2 BLEND_POOL + 1)^2 pixels first (the reference's k = 1)


@dataclass
class P2P:
    """The settings of a Prompt-to-Prompt edit (defaults: the authors' main_run.py)."""
    xa: float = P2P_CROSS_FRACTION      # cross-attention injected during this fraction of the steps
    sa: float = P2P_SELF_FRACTION       # self-attention (layers of <= 256 keys) during this fraction
    blend: tuple[str, ...] = ()         # local blend words, looked up in the source and every target (): none
    reweight: dict[str, float] = field(default_factory=dict)   # target word -> scale of its maps (within xa)
    window: str = "all"                 # what xa and sa are fractions of: "all" N steps, or the N - skip "run"

    def steps(self, num_steps: int, skip: int) -> tuple[int, int]:
        """(cross_steps, self_steps): the first steps of the regeneration in which maps are injected."""
        if self.window not in P2P_WINDOWS:
            raise ValueError(f"window must be one of {P2P_WINDOWS}, got {self.window!r}")
        n = num_steps if self.window == "all" else num_steps - skip
        return int(self.xa * (n + 1)), int(self.sa * n)

    def injects(self, num_steps: int, skip: int) -> bool:
        """Whether anything is injected: a step in either window, or a local blend. (Without, the P2P edit is the
        plain edit, and is run as one.)"""
        return self.steps(num_steps, skip) != (0, 0) or bool(self.blend)

    def settings(self, num_steps: int, skip: int) -> dict:
        """What an output records: the settings and the numbers of steps they came to."""
        cross_steps, self_steps = self.steps(num_steps, skip)
        return {"xa": self.xa, "sa": self.sa, "window": self.window, "cross_steps": cross_steps,
                "self_steps": self_steps, "blend": list(self.blend), "reweight": dict(self.reweight)}


def defaults_for(method: str) -> P2P:
    """The authors' settings for a code of that inversion method ("edit_friendly", "native", "ddim"): xa 0.8, sa 0.4
    on DDIM's (main_run.py --mode p2pddim), else P2P()'s xa 0.6, sa 0.2 (--mode p2pinv)."""
    return P2P(xa=P2P_DDIM_CROSS_FRACTION, sa=P2P_DDIM_SELF_FRACTION) if method == "ddim" else P2P()


def mode(source: str, target: str) -> str:
    """"replace" (word swap) when the prompts have equally many words, else "refine" (adding a phrase): the
    reference's choice (main_run.py compares len(prompt.split(" ")))."""
    return "replace" if len(words_of(source)) == len(words_of(target)) else "refine"


class CrossEdit:
    """A target row's cross-attention maps from the source row's: word swap or phrase addition, then re-weighting.
    (Edit(M_t, M*_t, t) of P2P Sec. 3.2, within the window.)"""

    def __init__(self, source: Tokens, target: Tokens, reweight: dict[str, float]):
        self.mode = mode(source.text, target.text)
        if self.mode == "replace":
            self.matrix = replacement_mapper(source, target)                     # [77, 77]
        else:
            self.index, self.alpha = refinement_mapper(source, target)          # [77], [77]
        self.scale = equalizer(target, reweight) if reweight else None         # [77]
        self.cache: dict = {}

    def on(self, t: Tensor, name: str) -> Tensor:
        """The mapper tensor `name` on t's device (and in its dtype, unless an index)."""
        key = (name, t.device, t.dtype)
        if key not in self.cache:
            value = getattr(self, name)
            self.cache[key] = value.to(t.device) if name == "index" else value.to(t.device, t.dtype)
        return self.cache[key]

    def __call__(self, base: Tensor, own: Tensor) -> Tensor:
        """base: the source row's maps [heads, N, 77]; own: the target row's [heads, N, 77] -> the target's new."""
        if self.mode == "replace":
            new = base @ self.on(base, "matrix")                                # sum_i M[i, j] M_src[..., i]
        else:
            alpha = self.on(base, "alpha")
            new = base[..., self.on(base, "index")] * alpha + own * (1 - alpha)  # (M_t)_{i,A(j)} or M*_ij
        return new if self.scale is None else new * self.on(base, "scale")    # c M_ij for j = j*


class LocalBlend:
    """P2P's localized editing (its Sec. 4; the recipe is the reference's LocalBlend): a target row keeps the source's
    x_t outside a mask made from the cross-attention maps of the blend words: the maps of the blend layers, summed
    over the steps so far, over the words' tokens, over layers and heads; max-pooled 3x3; resized to x_t; divided by
    their maximum; > 0.3. The source's mask and each target's are joined:
    x_t = x_src + (m_src | m_tgt) (x_t - x_src)."""

    def __init__(self, prompts: Sequence[Tokens], words: Sequence[str], level: int):
        self.level = level                                                       # the blend layers' level
        self.words = torch.zeros(len(prompts), 77, dtype=torch.float64)         # [rows, 77]: the words' tokens
        for row, tokens in enumerate(prompts):
            for word in words:
                self.words[row, word_positions(tokens, word)] = 1.0
        self.maps: Tensor | None = None                                          # [rows, N], summed so far

    def observe(self, probs: Tensor) -> None:
        """Add a blend layer's maps [rows, heads, N, 77] (the conditional rows, as they were used)."""
        words = self.words.to(probs.device, probs.dtype)
        maps = (probs * words[:, None, None, :]).sum(-1).sum(1)                 # [rows, N]
        self.maps = maps if self.maps is None else self.maps + maps

    def __call__(self, x: Tensor) -> Tensor:
        """x [rows, C, h, w] (source first) -> the targets blended with the source."""
        h, w = x.shape[-2] >> self.level, x.shape[-1] >> self.level
        maps = self.maps.reshape(-1, 1, h, w)                                    # [rows, 1, h', w']
        mask = F.max_pool2d(maps, 2 * BLEND_POOL + 1, stride=1, padding=BLEND_POOL)
        mask = F.interpolate(mask, size=tuple(x.shape[-2:]))                     # nearest, [rows, 1, h, w]
        mask = mask / mask.amax(dim=(2, 3), keepdim=True)
        mask = mask.gt(BLEND_THRESHOLD)
        mask = (mask[:1] | mask[1:]).to(x.dtype)                                 # [targets, 1, h, w]
        return torch.cat([x[:1], x[:1] + mask * (x[1:] - x[:1])])


class PromptToPrompt:
    """The attention controller of a P2P regeneration of rows [source, target_1..target_K] (efddpm.nets.attention_
    control's protocol). `step` counts the regeneration's steps from 0; step_callback ends each."""

    def __init__(self, source: Tokens, targets: Sequence[Tokens], p2p: P2P, *, num_steps: int, skip: int,
                 blend_level: int | None = None):
        self.edits = [CrossEdit(source, target, p2p.reweight) for target in targets]
        self.rows = 1 + len(self.edits)
        self.cross_steps, self.self_steps = p2p.steps(num_steps, skip)
        if p2p.blend and blend_level is None:
            raise ValueError("a local blend needs the level of its layers (blend_level)")
        self.blend = LocalBlend([source, *targets], p2p.blend, blend_level) if p2p.blend else None
        self.step, self.consulted = 0, 0

    def blends(self, site) -> bool:
        """Whether the local blend reads this layer: cross-attention of the blend level, outside the middle block."""
        return self.blend is not None and site.cross and site.place != "mid" and site.level == self.blend.level

    def wants(self, site, queries: int, keys: int) -> bool:
        """Cross-attention: within the cross window, or for the blend; self-attention: within the self window, in
        layers of at most 256 keys. Nothing at all when both windows are closed and there is no blend."""
        self.consulted += 1
        if site.cross:
            return self.step < self.cross_steps or self.blends(site)
        return self.step < self.self_steps and keys <= SELF_MAX_KEYS

    def __call__(self, site, probs: Tensor) -> Tensor:
        """probs [B, heads, N, keys]: the last `rows` rows are the conditional half, source first."""
        cond = probs[-self.rows:]                                                # [rows, heads, N, keys]
        if site.cross and self.step < self.cross_steps:  # P2P Alg. 1: M^_t <- Edit(M_t, M*_t, t)
            cond = torch.stack([cond[0], *(e(cond[0], own) for e, own in zip(self.edits, cond[1:]))])
        elif not site.cross:                                                     # (wants: in the self window)
            cond = cond[:1].expand_as(cond)                                      # the source's maps, whole
        if self.blends(site):
            self.blend.observe(cond)
        return torch.cat([probs[:-self.rows], cond])

    def step_callback(self, n: int, x: Tensor) -> Tensor:
        """After the step to x_{n-1} [rows, ...]: the local blend, then the next step."""
        if self.consulted == 0:
            raise RuntimeError("the attention controller was never consulted: set it on the UNet "
                               "(with unet.controlled(control): ...), and do not replay a CUDA graph")
        if self.blend is not None:
            x = self.blend(x)
        self.step += 1
        return x



class Grouped:
    """Several P2P controllers on one regeneration, each on its own consecutive rows of the conditional half (the
    jobs of a batch, efddpm.app.batched): [source_1, targets_1..., source_2, targets_2..., ...]. A layer computes its
    probabilities explicitly when any controller wants them; the others get theirs back unchanged."""

    def __init__(self, controls: Sequence[PromptToPrompt]):
        self.controls = list(controls)
        self.rows = sum(c.rows for c in self.controls)
        self.asked: list[bool] = []

    def wants(self, site, queries: int, keys: int) -> bool:
        self.asked = [c.wants(site, queries, keys) for c in self.controls]   # every controller counts the call
        return any(self.asked)

    def __call__(self, site, probs: Tensor) -> Tensor:
        """probs [B, heads, N, keys]: the last `rows` rows are the conditional half, group after group."""
        groups = probs[-self.rows:].split([c.rows for c in self.controls])      # [rows_g, heads, N, keys] each
        cond = [c(site, own) if asked else own for c, asked, own in zip(self.controls, self.asked, groups)]
        return torch.cat([probs[:-self.rows], *cond])

    def step_callback(self, n: int, x: Tensor) -> Tensor:
        """x [rows, ...]: each group's step callback on its own rows."""
        return torch.cat([c.step_callback(n, own) for c, own in zip(self.controls, x.split([c.rows for c in
                                                                                            self.controls]))])

def p2p_edit(f: NoisePredictor, code: LatentCode, source_cond: Tensor, target_conds: Tensor, uncond: Tensor,
             source_guidance: float | None, target_guidance: float | Sequence[float], *, control: PromptToPrompt,
             skip: int, **options) -> Tensor:
    """Regenerate [source; targets] from x_{T-skip} with the code's noise maps, P2P's `control` set on the UNet
    behind f. source_cond [1, ...], target_conds [K, ...]; source_guidance None: the code had no source prompt
    (source_cond is then the unconditional one, and the row takes guidance 0: f_u exactly); target_guidance: one or
    one per target. Returns x_0 [1 + K, ...]: the source row (the input again, up to rounding, on an edit-friendly
    or native code), then the edits. options: those of efddpm.method.inversion.regenerate."""
    k = target_conds.shape[0]
    if control.rows != 1 + k:
        raise ValueError(f"the controller has {control.rows - 1} targets, got {k} target conditionings")
    targets = torch.as_tensor(target_guidance, dtype=torch.float64).reshape(-1).expand(k).tolist()
    guidance = [0.0 if source_guidance is None else float(source_guidance), *targets]
    conds = torch.cat([source_cond, target_conds])                                # [1 + K, ...]
    return regenerate(f, code, conds, uncond, guidance, skip=skip, step_callback=control.step_callback, **options)
