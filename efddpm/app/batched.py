"""The batched engine of a dataset run: K images inverted and regenerated together, each by its own noise.

A job is one image, its source prompt, its targets (a guidance each), its seed and, optionally, Prompt-to-Prompt.
Jobs of one kind (kind(): with or without a source prompt, with or without P2P) and the run's settings go through
together:

    1. every picture read on its own (a damaged one fails alone), all encoded in one VAE call   x_0 [K, 4, h, w]
    2. every job's eps~ drawn from a generator seeded with its own seed, as Editor.invert draws them: [N, 1, ...]
       each, stacked to [N, K, ...], so a job's draws do not depend on its batch
    3. Algorithm 1 over the K rows at once: each inversion step one UNet call over all images (on the CUDA fast path
       over the timesteps of a chunk too: efddpm.app.fast)
    4. the regeneration of every (job, target) row at once, each row replaying the noise maps of its job's code:
       one UNet call per step over all images x targets x guidance halves; with P2P each job's source row beside its
       targets and each job's controller on its own rows (efddpm.method.p2p.Grouped)
    5. every row decoded at once; a row that is not finite fails its job alone.

The method (Settings.method, `efddpm batch --method`; the paper's comparisons, as efddpm.miniature.measure runs them):

    edit-friendly   the above
    native          the native DDPM inversion (the forward chain's x_1..x_T, eq. 1) in step 3, the rest the same
    ddim            no draws in step 2; step 3 the DDIM inversion under the source guidance (one UNet call per step
                    over the K images, all N steps); step 4 deterministic (the code's z are 0, eta 0); its eta is
                    ignored; P2P as above (the authors' DDIM + P2P baseline)
    sdedit          no inversion (the source prompt and guidance are not read, P2P is refused): every (job, target)
                    row is the job's x_0 noised to the paper's t = T - skip (eq. 2), then sampled with fresh z's
                    under the target (efddpm.method.manipulations.sdedit), all rows in one UNet call per step; a
                    job's draws come from its own generator (sdedit_rows says in which order)

K = 1 gives the bytes of Editor.invert + Editor.edit (the sequential `efddpm edit`), and for the other methods those
of the efddpm.method functions on the job alone; K > 1 the same edits up to rounding, since the UNet, VAE and CLIP
sum in another order at another batch size (tests/test_batched.py states the tolerance). So in half precision a
job's bits depend on the batch it lands in; --batch-size 1 makes them depend on the job alone.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, TypeVar

import torch
from PIL import Image

from efddpm.app import prompt_to_prompt
from efddpm.app.editor import NOT_FINITE
from efddpm.app.fast import SATURATING_BATCH
from efddpm.app.images import load_image, to_pil
from efddpm.core import checks
from efddpm.core.checks import InputError
from efddpm.method.inversion import regenerate
from efddpm.method.latent_code import LatentCode
from efddpm.method.manipulations import sdedit, sdedit_noise
from efddpm.method.network import draw_noise, working_dtype
from efddpm.method.p2p import P2P, Grouped, PromptToPrompt
from efddpm.method.scheduler import max_steps
from efddpm.method.seq_align import tokenize

Item = TypeVar("Item")
INVERSIONS = {"edit-friendly": "edit_friendly", "native": "native", "ddim": "ddim"}   # a method's code's "method"
METHODS = (*INVERSIONS, "sdedit")


@dataclass
class Job:
    """One image's edits."""
    image: object                  # anything efddpm.app.images.load_image reads (a path, a PIL image, ...)
    source: str                    # "": no guidance term during the inversion
    targets: list[str]
    guidances: list[float]         # one per target
    seed: int                      # the job's own: its draws come from torch.Generator(device).manual_seed(seed)
    p2p: P2P | None = None         # checked settings (efddpm.app.prompt_to_prompt.checked); None: a plain edit


@dataclass(frozen=True)
class Settings:
    """What the jobs of a batch share."""
    steps: int
    source_guidance: float         # of the inversion (sdedit: not read)
    eta: float | None              # of the inversion, or of SDEdit's sampling (ddim: not read, its eta is 0)
    skip: int                      # T_skip (sdedit: starts at the paper's t = steps - skip)
    size: int | None = None        # the picture side; None: the model's
    method: str = "edit-friendly"  # one of METHODS


@dataclass
class Edited:
    """A job's result: one image per target, and how its noise was made: its inversion's settings (those
    Editor.invert records; ddim: ddim_inversion's), or sdedit's (sdedit_rows)."""
    images: list[Image.Image]
    inversion: dict


def default_batch_size(device: torch.device) -> int:
    """K when the user gives none: on CUDA as many jobs as keep one target's regeneration step at SATURATING_BATCH
    UNet samples (two guidance halves per job: 16), on the CPU 1 (every job's bits its own). From the device type
    only, never from free memory: the same command makes the same batches, hence the same bytes."""
    return max(1, SATURATING_BATCH // 2) if device.type == "cuda" else 1


def kind(job: Job, method: str = "edit-friendly") -> tuple[bool, bool]:
    """Jobs batch together when they agree on this: with a source prompt or not (a guided inversion or a single
    call; sdedit reads none), with Prompt-to-Prompt or not (a controller on the UNet, no CUDA graph)."""
    return bool(job.source) and method != "sdedit", job.p2p is not None


def batches(items: Iterable[Item], size: int, key: Callable[[Item], object]) -> Iterator[list[Item]]:
    """Items in batches of at most `size` of one key each: a batch is emitted as soon as it is full, the rest at the
    end in the order their keys first came; within a batch, the items' own order."""
    open_batches: dict[object, list[Item]] = {}
    for item in items:
        batch = open_batches.setdefault(key(item), [])
        batch.append(item)
        if len(batch) == size:
            yield open_batches.pop(key(item))
    yield from open_batches.values()


def plain(p2p: P2P | None, steps: int, skip: int) -> P2P | None:
    """None when P2P would inject nothing (P2P.injects): Editor.edit runs those plainly."""
    return p2p if p2p is not None and p2p.injects(steps, skip) else None


@torch.inference_mode()
def edit_batch(editor, jobs: list[Job], settings: Settings) -> list[Edited | InputError]:
    """The jobs' edits, each job's Edited or the InputError that stopped it (a damaged image, a bad guidance, a
    non-finite result).
    The jobs must share kind(); InputError for the settings or the batch as a whole."""
    method = settings.method
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if len({kind(job, method) for job in jobs}) != 1:
        raise InputError("a batch holds jobs of one kind (source prompt or not, P2P or not)")
    if method == "sdedit" and jobs[0].p2p is not None:
        raise InputError("Prompt-to-Prompt replays an inversion's source row, and sdedit inverts nothing")
    steps = checks.steps(settings.steps, max_steps())
    settings = Settings(steps, settings.source_guidance, None if method == "ddim" else checks.inversion_eta(
        settings.eta), checks.skip(settings.skip, steps), editor.check_size(settings.size), method)
    checked, loaded, results = {}, {}, {}
    for i, job in enumerate(jobs):
        try:
            checked[i] = replace(job, targets=editor.prompt_list(job.targets, "targets"),
                                 guidances=checks.guidances(job.guidances, len(job.targets)))
            loaded[i] = load_image(job.image, settings.size)                     # [1, 3, size, size], a note
        except InputError as e:
            results[i] = e
    if loaded:
        ok, pictures = [checked[i] for i in loaded], list(loaded.values())
        if method == "sdedit":
            results.update(zip(loaded, sdedit_rows(editor, ok, pictures, settings)))
        else:
            results.update(zip(loaded, regenerate_rows(editor, ok, invert(editor, ok, pictures, settings), settings)))
    return [results[i] for i in range(len(jobs))]


def invert(editor, jobs: list[Job], pictures: list[tuple[torch.Tensor, str]], settings: Settings) -> list[LatentCode]:
    """The jobs' pictures (each [1, 3, H, W] and its resize note) inverted at once by the settings' method (Algorithm
    1, the native inversion, or DDIM's, which draws nothing); one LatentCode per job, its settings those
    Editor.invert gives (ddim: ddim_inversion's)."""
    steps, skip, method = settings.steps, settings.skip, INVERSIONS[settings.method]
    x0 = editor.encode_pictures(torch.cat([pixels for pixels, _ in pictures]))  # [K, 4, h, w]
    device, drawn = editor.device, method != "ddim"
    noise = torch.cat([draw_noise((steps, 1, *x0.shape[1:]), torch.Generator(device).manual_seed(job.seed),
                                  x0.dtype, device) for job in jobs], dim=1) if drawn else None   # eps~, [N, K, ...]
    uncond = editor.encode_prompts("")                                           # [1, 77, d]
    guided = bool(jobs[0].source)                                                # "": no guidance term
    cond = torch.cat([editor.encode_prompts(job.source) for job in jobs]) if guided else None   # [K, 77, d]
    guidance = checks.guidance(settings.source_guidance) if guided else None
    chunk = editor.inversion_chunk(x0, steps - skip, guided) if drawn else 1     # DDIM's steps are sequential
    batch = editor.run_inversion(x0, cond, uncond, guidance, steps=steps, eta=settings.eta, skip=skip, chunk=chunk,
                                 noise=noise, source_prompt="", note="", method=method)   # each job's own, below
    return [LatentCode(batch.x_T[i:i + 1], batch.zs[:, i:i + 1], batch.xts[:, i:i + 1], batch.timesteps,
                       {**batch.settings, **({"noise": "generator", "seed": job.seed} if drawn else {}),
                        "source_prompt": job.source, "image": note})             # keys in Editor.invert's order
            for i, (job, (_, note)) in enumerate(zip(jobs, pictures))]


def regenerate_rows(editor, jobs: list[Job], codes: list[LatentCode], settings: Settings) -> list[Edited | InputError]:
    """Every job's rows regenerated together: [source (P2P only), targets...] per job, job after job."""
    steps, skip = settings.steps, settings.skip
    p2ps = [plain(job.p2p, steps, skip) for job in jobs]
    with_source = p2ps[0] is not None
    if any((p is not None) != with_source for p in p2ps):
        raise InputError("a batch holds jobs whose Prompt-to-Prompt injects something, or jobs whose does not")
    uncond = editor.encode_prompts("")                                           # [1, 77, d]
    rows, own, conds, guidances = [], [], [], []          # own: each job's target rows
    for i, (job, code) in enumerate(zip(jobs, codes)):   # the encodings Editor.edit makes, job by job
        if with_source:
            rows.append(i)
            conds.append(editor.encode_prompts(job.source) if job.source else uncond)
            guidances.append(0.0 if code.settings["guidance"] is None else float(code.settings["guidance"]))
        own.append(range(len(rows), len(rows) + len(job.targets)))
        rows += [i] * len(job.targets)
        conds.append(editor.encode_prompts(job.targets))
        guidances += job.guidances
    index = torch.tensor(rows, device=editor.device)
    stacked = LatentCode(*(torch.cat([getattr(c, name) for c in codes], dim=dim).index_select(dim, index)
                           for name, dim in (("x_T", 0), ("zs", 1), ("xts", 1))),
                         codes[0].timesteps, dict(codes[0].settings))              # one row per (job, target)
    f = editor.noise_predictor(graphed=True)
    if with_source:
        control = Grouped([PromptToPrompt(tokenize(editor.models.tokenizer, job.source),
                                          [tokenize(editor.models.tokenizer, t) for t in job.targets], p2p,
                                          num_steps=steps, skip=skip, blend_level=
                                          prompt_to_prompt.blend_level(editor.models.unet) if p2p.blend else None)
                           for job, p2p in zip(jobs, p2ps)])
        with editor.models.unet.controlled(control):
            latents = regenerate(f, stacked, torch.cat(conds), uncond, guidances, skip=skip,
                                 step_callback=control.step_callback)               # [R, 4, h, w]
    else:
        latents = regenerate(f, stacked, torch.cat(conds), uncond, guidances, skip=skip)   # [R, 4, h, w]
    return decoded(editor, latents, own, [code.settings for code in codes])


def sdedit_rows(editor, jobs: list[Job], pictures: list[tuple[torch.Tensor, str]],
                settings: Settings) -> list[Edited | InputError]:
    """SDEdit of every (job, target) row at once, from the paper's t = T - skip. A job's draws are those of
    sdedit(..., generator=torch.Generator(device).manual_seed(job.seed)) on its picture repeated once per target:
    first the noising's eps of all its targets (one [targets, 4, h, w] draw), then each step's z of all its targets
    (one such draw per step, t = T - skip .. 1), so its targets get different noise, and the batch stacks each
    job's draws."""
    steps, start, device = settings.steps, settings.steps - settings.skip, editor.device
    x0 = editor.encode_pictures(torch.cat([pixels for pixels, _ in pictures]))  # [K, 4, h, w]
    rows = [i for i, job in enumerate(jobs) for _ in job.targets]                # each (job, target) row's job
    own = [range(rows.index(i), rows.index(i) + len(job.targets)) for i, job in enumerate(jobs)]
    conds = torch.cat([editor.encode_prompts(job.targets) for job in jobs])      # [R, 77, d]
    dtype = working_dtype(x0)
    noise = torch.cat([sdedit_noise((len(job.targets), *x0.shape[1:]), start,
                                    torch.Generator(device).manual_seed(job.seed), dtype, device)
                       for job in jobs], dim=1)                                  # [start + 1, R, 4, h, w]
    latents = sdedit(editor.noise_predictor(graphed=True), x0.index_select(0, torch.tensor(rows, device=device)),
                     start, conds, editor.encode_prompts(""), [w for job in jobs for w in job.guidances],
                     num_steps=steps, eta=settings.eta, noise=noise)            # [R, 4, h, w]
    dtypes = {"dtype": str(dtype).removeprefix("torch."), "model_dtype": str(editor.dtype).removeprefix("torch.")}
    return decoded(editor, latents, own, [{"method": "sdedit", "num_steps": steps, "eta": settings.eta, "start": start,
                                           "noise": "generator", "seed": job.seed, "model": editor.models.source,
                                           "image": note, **dtypes, "skip": settings.skip}
                                          for job, (_, note) in zip(jobs, pictures)])


def decoded(editor, latents: torch.Tensor, own: list[range], records: list[dict]) -> list[Edited | InputError]:
    """Each job's target rows of latents [R, 4, h, w] (own: their positions, job by job) decoded at once, with its
    record; a job with a row that is not finite fails alone."""
    finite = torch.isfinite(latents).flatten(1).all(1).tolist()                  # [R]
    done = [all(finite[r] for r in targets) for targets in own]                  # a job's target rows all finite
    wanted = [r for targets, ok in zip(own, done) if ok for r in targets]
    pictures = iter(to_pil(editor.decode(latents[wanted])) if wanted else [])
    return [Edited([next(pictures) for _ in targets], record) if ok else InputError(NOT_FINITE)
            for targets, ok, record in zip(own, done, records)]
