"""Prompt-to-Prompt edits of a latent code with the SD1.x networks: what Editor.edit(..., p2p=P2P(...)) runs.

The method is efddpm.method.p2p; here the prompts become tokens (efddpm's tokenizer) and CLIP states, the settings are
checked (efddpm.core.checks), the controller is set on the UNet for the regeneration (efddpm.nets.attention_control),
and the source row's prompt and guidance come from the code: those it was inverted with.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from efddpm.core import checks
from efddpm.core.checks import InputError
from efddpm.method.defaults import default_skip
from efddpm.method.latent_code import LatentCode
from efddpm.method.p2p import P2P, PromptToPrompt, p2p_edit
from efddpm.method.seq_align import tokenize


def checked(p2p: P2P, source: str, targets: list[str], names: dict | None = None) -> P2P:
    """The settings with every value checked (InputError names the setting as `names` spells it: the command line
    passes its flags)."""
    names = {"xa": "xa", "sa": "sa", "window": "window", "blend": "blend", "reweight": "reweight", **(names or {})}
    if not isinstance(p2p, P2P):
        raise InputError(f"p2p must be an efddpm.method.p2p.P2P, got {type(p2p).__name__}")
    xa, sa = checks.fraction(p2p.xa, names["xa"]), checks.fraction(p2p.sa, names["sa"])
    reweight = checks.reweights(p2p.reweight, targets, names["reweight"])
    if reweight and xa == 0:
        raise InputError(f"{names['reweight']} scales the maps injected during the cross-attention window: "
                         f"{names['xa']} must be above 0")
    return replace(p2p, xa=xa, sa=sa, window=checks.p2p_window(p2p.window, names["window"]),
                   blend=checks.blend_words(p2p.blend, [source, *targets], names["blend"]) if p2p.blend else (),
                   reweight=reweight)


def blend_level(unet) -> int:
    """The level of the local blend's layers: the deepest with cross-attention outside the middle block (SD1.x at
    512 pixels: 16x16, the reference's choice)."""
    levels = [s.level for s in unet.attention_sites if s.cross and s.place != "mid"]
    if not levels:
        raise InputError("this UNet has no cross-attention outside its middle block: no maps for a local blend")
    return max(levels)


def edit_latents(editor, code: LatentCode, targets: list[str], p2p: P2P, *, guidance: list[float] | float,
                 skip: int | None, eta: float | None, progress=None) -> torch.Tensor:
    """The targets' x_0 [K, 4, h, w] of a P2P edit of `code` (an inversion of one image). With nothing to inject
    (no step in either window, no blend) it is the plain edit, bit for bit, without the source row's work."""
    if isinstance(code, LatentCode) and code.x_T.dim() and code.x_T.shape[0] != 1:
        raise InputError(f"Prompt-to-Prompt edits one inversion; the code holds {code.x_T.shape[0]}")
    editor.check_code(code)
    n = code.num_steps
    skip = checks.skip(default_skip(n) if skip is None else skip, n, inverted_skip=code.settings["skip"])
    source = code.settings.get("source_prompt", "")
    p2p = checked(p2p, source, targets)
    if not p2p.injects(n, skip):
        return editor.regenerate(code, targets, guidance=guidance, skip=skip, eta=eta, progress=progress)
    guidance = checks.guidances(guidance, len(targets))
    eta = None if eta is None else checks.eta(eta)
    tokenizer, unet = editor.models.tokenizer, editor.models.unet
    control = PromptToPrompt(tokenize(tokenizer, source), [tokenize(tokenizer, t) for t in targets], p2p,
                             num_steps=n, skip=skip, blend_level=blend_level(unet) if p2p.blend else None)
    uncond = editor.encode_prompts("")
    source_cond = editor.encode_prompts(source) if source else uncond     # "": the code has no guidance term
    f = editor.noise_predictor(progress, graphed=True)                     # (GraphedUNet runs eagerly: controlled)
    with unet.controlled(control):
        latents = p2p_edit(f, code.to(editor.device), source_cond, editor.encode_prompts(targets), uncond,
                           code.settings["guidance"], guidance, control=control, skip=skip, eta=eta)
    return editor.check_output(latents[1:])                                # [K, 4, h, w]: the source row dropped
