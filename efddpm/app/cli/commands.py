"""The subcommands. Each checks its settings, reads and checks its inputs, and returns the Plan of the rest
(its outputs' names, its prompts, its work); efddpm.app.cli.runner.run performs it in the order all share.
batch is a dataset run instead (efddpm.app.dataset_run), and returns its exit status."""
import os
from pathlib import Path

from efddpm.app.cli.inputs import (check_images, check_output_folder, check_p2p_flags, check_settings, p2p_settings,
                                   parse_colour, read_code, read_mask, read_noise, seeds_for)
from efddpm.app import batched
from efddpm.app.cli.parser import UsageError
from efddpm.app.cli.runner import (Output, Plan, Progress, load_editor, model_dtype, note, png_text,
                                   warn_long_prompts)
from efddpm.app.dataset_run import DatasetRun, Group, shard_device, shard_from
from efddpm.app.datasets import read_dataset
from efddpm.app.embedded import DEFAULT_MODEL
from efddpm.app.images import grid, load_image, open_image, png_writer, to_pil
from efddpm.core import checks
from efddpm.core.checks import InputError
from efddpm.method.defaults import ETA, SOURCE_GUIDANCE, default_colour_range, default_skip
from efddpm.method.p2p import P2P, defaults_for, mode

TILE_KEYS = ("target", "cfg_tgt", "seed", "inversion", "p2p")   # the settings of an edit that differ between tiles
RUN_KEYS = ("method", "steps", "skip", "cfg_src", "cfg_tgt", "eta", "size", "p2p", "xa", "sa", "p2p_window", "blend",
            "reweight", "batch_size", "compile")
# batch: the flags that make its pictures, with the model, device type and dtype, make a dataset run's settings
# (batch_size and compile too: in half precision the batch and the kernels decide the rounding)


def output_names(out: Path, stem: str, n_targets: int, seeds: list[int]) -> list[Path]:
    """The PNG of each (seed, target): stem_k.png, or stem_k_seedS.png when there are several seeds."""
    return [out / (f"{stem}_{k + 1}.png" if len(seeds) == 1 else f"{stem}_{k + 1}_seed{s}.png")
            for s in seeds for k in range(n_targets)]


def target_guidances(cfg_tgt: float | list[float] | None, editor, n: int) -> list[float]:
    """--cfg-tgt (a number, one per target, or None: the model's default) as one weight per target."""
    return checks.guidances(editor.target_guidance if cfg_tgt is None else cfg_tgt, n, "--cfg-tgt")


def p2p_record(p2p: P2P | None, steps: int, skip: int, source: str, target: str) -> dict:
    """The "p2p" entry of an edit's metadata: the settings, the steps they came to, word swap or phrase addition."""
    return {} if p2p is None else {"p2p": {**p2p.settings(steps, skip), "mode": mode(source, target)}}


def edit_record(args, image, source: str, target: str, guidance: float, inversion: dict, img, p2p: P2P | None) -> dict:
    """The settings an edited PNG records (efddpm.app.cli.runner.record adds the model's)."""
    return dict(image=str(image), resize=inversion["image"], source=source, target=target, cfg_src=args.cfg_src,
                cfg_tgt=guidance, steps=args.steps, skip=args.skip, eta=args.eta, seed=inversion["seed"],
                size=int(img.width), **p2p_record(p2p, args.steps, args.skip, source, target), inversion=inversion)


def edit_one(args, editor, image, source: str, targets: list[str], guidances: list[float], seeds: list[int],
             out: Path, stem: str, *, with_grid: bool = False, noise=None, p2p: P2P | None = None,
             chatty: bool = True) -> list[Output]:
    """Invert `image` once per seed, edit it with every target (with Prompt-to-Prompt when p2p is given): the PNGs
    (and the grid). chatty: a progress bar over its steps and a note of the resize (batch: off, its run has a bar
    of its own)."""
    edits, inversions = [], []
    with Progress(len(seeds) * 2 * (args.steps - args.skip), args.quiet or not chatty) as progress:
        for seed in seeds:   # inversion and edit (overlapped on a GPU): steps - skip network calls each
            images, code = editor.invert_and_edit(
                image, source, targets, steps=args.steps, source_guidance=args.cfg_src, guidance=guidances,
                skip=args.skip, eta=args.eta, seed=None if noise is not None else seed, noise=noise, size=args.size,
                progress=progress, p2p=p2p)
            inversions.append(code.settings)
            for target, guidance, img in zip(targets, guidances, images):
                edits.append((img, edit_record(args, image, source, target, guidance, code.settings, img, p2p)))
    if chatty:
        note(args, f"{image}: {code.settings['image']}")
    outputs = [Output(name, img, settings)
               for name, (img, settings) in zip(output_names(out, stem, len(targets), seeds), edits)]
    if with_grid:
        pixels, _ = load_image(image, edits[0][0].width)
        shared = {k: v for k, v in edits[0][1].items() if k not in TILE_KEYS}
        outputs.append(Output(out / f"{stem}_grid.png", grid(to_pil(pixels) + [img for img, _ in edits]), {
            **shared, "layout": "input | edits, seed by seed, targets in order",
            "tiles": [{k: s[k] for k in ("seed", "target", "cfg_tgt", "p2p") if k in s} for _, s in edits],
            "inversions": inversions}))
    return outputs


def edit(args) -> Plan:
    check_settings(args)
    open_image(args.image)  # fail on a bad image before loading any model
    noise = read_noise(args.noise)
    p2p = p2p_settings(args, args.source, args.target)
    out, stem, seeds = Path(args.out), Path(args.image).stem, seeds_for(args)

    def work(editor):
        guidances = target_guidances(args.cfg_tgt, editor, len(args.target))
        yield edit_one(args, editor, args.image, args.source, args.target, guidances, seeds, out, stem,
                       with_grid=args.grid, noise=noise, p2p=p2p)
    return Plan(folder=out, names=output_names(out, stem, len(args.target), seeds)
                + ([out / f"{stem}_grid.png"] if args.grid else []),
                prompts=[args.source, *args.target], work=work)


def invert(args) -> Plan:
    check_settings(args)
    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise UsageError(f"-o must name a .safetensors file, got {output}")
    open_image(args.image)
    noise = read_noise(args.noise)
    seed = None if noise is not None else seeds_for(args)[0]

    def work(editor):
        with Progress(args.steps, args.quiet) as progress:
            code = editor.invert(args.image, args.source, steps=args.steps, guidance=args.cfg_src, eta=args.eta,
                                 seed=seed, noise=noise, size=args.size, progress=progress)
        note(args, f"{args.image}: {code.settings['image']}")
        yield [Output(output, code, dict(image=str(args.image)))]
    return Plan(folder=output.parent, names=[output], prompts=[args.source], work=work)


def regenerate(args) -> Plan:
    code = read_code(args.code)
    n = code.num_steps
    args.skip = checks.skip(default_skip(n) if args.skip is None else args.skip, n, "--skip",
                            inverted_skip=code.settings["skip"])
    if args.cfg_tgt is not None:
        args.cfg_tgt = checks.guidances(args.cfg_tgt, len(args.target), "--cfg-tgt")
    check_p2p_flags(args)
    source = code.settings.get("source_prompt", "")
    p2p = p2p_settings(args, source, args.target)
    model = args.model or code.settings.get("model")
    if not isinstance(model, str) or not model:
        raise UsageError(f"{args.code} does not name its model; pass --model")
    out = Path(args.out)
    names = [out / f"{Path(args.code).stem}_{k + 1}.png" for k in range(len(args.target))]

    def work(editor):
        guidances = target_guidances(args.cfg_tgt, editor, len(args.target))
        with Progress(n - args.skip, args.quiet) as progress:
            images = editor.edit(code, args.target, guidance=guidances, skip=args.skip, progress=progress, p2p=p2p)
        yield [Output(name, img, dict(code=str(args.code), source=code.settings.get("source_prompt"), target=target,
                                      cfg_tgt=guidance, skip=args.skip,
                                      **p2p_record(p2p, n, args.skip, source, target), inversion=code.settings))
               for name, target, guidance, img in zip(names, args.target, guidances, images)]
    return Plan(folder=out, names=names, prompts=args.target, work=work, model=model)


def manipulate(args, suffix: str, apply, *, check, settings: dict) -> Plan:
    """The Plan of shift and recolor: invert args.image, then apply(editor, code, progress) -> (PIL image,
    settings used); write <stem>_<suffix>.png."""
    out, seed = Path(args.out), seeds_for(args)[0]
    name = out / f"{Path(args.image).stem}_{suffix}.png"

    def work(editor):
        skip = getattr(args, "skip", None) or 0   # shift: the code serves a regeneration from x_{T-skip}
        with Progress(2 * (args.steps - skip), args.quiet) as progress:
            code = editor.invert(args.image, args.source, steps=args.steps, guidance=args.cfg_src, eta=args.eta,
                                 seed=seed, size=args.size, skip=skip, progress=progress)
            note(args, f"{args.image}: {code.settings['image']}")
            img, used = apply(editor, code, progress)
        yield [Output(name, img, dict(image=str(args.image), source=args.source, cfg_src=args.cfg_src,
                                      steps=args.steps, eta=args.eta, seed=seed, **settings, **used,
                                      inversion=code.settings))]
    return Plan(folder=out, names=[name], prompts=[args.source], work=work, check=check)


def shift(args) -> Plan:
    check_settings(args)
    checks.integer("--dx", args.dx), checks.integer("--dy", args.dy)
    open_image(args.image)

    def check(editor):
        if args.skip is None:
            args.skip = editor.shift_skip(args.steps)
        side = editor.latent_side(args.size)
        checks.shift(args.dy, args.dx, (side, side), ("--dy", "--dx"))

    def apply(editor, code, progress):
        return editor.shift(code, args.dy, args.dx, skip=args.skip, progress=progress), {"skip": args.skip}
    return manipulate(args, f"shift_{args.dy}_{args.dx}", apply, check=check, settings=dict(dx=args.dx, dy=args.dy))


def recolor(args) -> Plan:
    check_settings(args)
    colour = parse_colour(args.color)
    step_range = checks.step_range(default_colour_range(args.steps) if args.t_range is None else args.t_range,
                                   args.steps, "--t-range")
    if args.strength is not None:
        checks.strength(args.strength, "--strength")
    image = open_image(args.image)
    mask = read_mask(args.mask, image)

    def check(editor):
        if args.cfg_src is None:
            args.cfg_src = editor.colour_source_guidance

    def apply(editor, code, progress):
        strength = editor.colour_strength if args.strength is None else args.strength
        img = editor.recolor(code, image, mask, colour, strength=strength, step_range=step_range, size=args.size,
                             progress=progress)
        return img, {"strength": strength}
    return manipulate(args, "recolor", apply, check=check,
                      settings=dict(mask=str(args.mask), color=args.color, t_range=list(step_range)))


def method_flags(args) -> None:
    """--cfg-src and --eta as --method reads them. sdedit inverts nothing: a given --cfg-src is refused (batch's
    default is None: SOURCE_GUIDANCE for the other methods). ddim is deterministic: an --eta other than the default
    is refused. What the method does not read is recorded as None."""
    if args.method == "sdedit" and args.cfg_src is not None:
        raise UsageError("--cfg-src is the source guidance of an inversion, and --method sdedit inverts nothing")
    if args.method == "ddim" and args.eta != ETA:
        raise UsageError("--eta: --method ddim is deterministic (its inversion and regeneration have eta 0)")
    args.cfg_src = None if args.method == "sdedit" else SOURCE_GUIDANCE if args.cfg_src is None else args.cfg_src
    args.eta = None if args.method == "ddim" else args.eta


def batch(args) -> int:
    """A dataset run (efddpm.app.dataset_run) through the batched engine (efddpm.app.batched) by --method:
    --batch-size items inverted and edited together, each item's PNGs written all or nothing and then listed in the
    manifest; a rerun resumes. Returns the exit status: 1 when an item failed."""
    check_settings(args)
    method_flags(args)
    shard = shard_from(args.shard, os.environ)
    args.device = shard_device(args.device, shard)
    args.quiet = args.quiet or shard.quiet
    items = read_dataset(args.file, image_root=args.image_root, image_root_name="--image-root")
    defaults = defaults_for(batched.INVERSIONS.get(args.method, ""))            # ddim: the authors' xa and sa
    p2ps = {item.id: p2p_settings(args, item.source, item.targets, item.options, f"batch file {args.file}: "
                                  f"{item.entry}: ", defaults) for item in items}
    if args.method == "sdedit" and (used := [item for item in items if p2ps[item.id] is not None]):
        raise UsageError("--p2p replays an inversion's source row, and --method sdedit inverts nothing" if args.p2p
                         else f"batch file {args.file}: {used[0].entry}: p2p replays an inversion's source row, and "
                              "--method sdedit inverts nothing")
    out = Path(args.out)
    check_output_folder(out)
    device = checks.device(args.device, "--device")
    if args.batch_size is None:
        args.batch_size = batched.default_batch_size(device)
    checks.integer("--batch-size", args.batch_size, low=1, high=4096)
    settings = {"model": args.model or str(DEFAULT_MODEL), "device": device.type, "dtype": model_dtype(args, device),
                **{key: getattr(args, key) for key in RUN_KEYS}}
    run = DatasetRun.prepare(out, items, settings, args.seed, shard, args.overwrite)
    check_images(args.file, run.todo)
    with Group(shard, device) as group:
        editor = load_editor(args) if run.todo else None
        if editor is not None:
            warn_long_prompts(editor, [p for item in run.todo for p in (item.source, *item.targets)])
        common = batched.Settings(args.steps, args.cfg_src, args.eta, args.skip, args.size, args.method)

        def job(item, seed: int) -> batched.Job:
            return batched.Job(item.image, item.source, item.targets,
                               target_guidances(args.cfg_tgt, editor, len(item.targets)), seed,
                               batched.plain(p2ps[item.id], args.steps, args.skip))

        def make(items, seeds: list[int]) -> list:
            jobs = [job(item, seed) for item, seed in zip(items, seeds)]
            results = batched.edit_batch(editor, jobs, common)
            return [result if isinstance(result, InputError) else writers(item, one, result)
                    for item, one, result in zip(items, jobs, results)]

        def writers(item, job: batched.Job, result: batched.Edited) -> list:
            extra = {"item_id": item.id, "run": {**run.settings, "seed": run.seed},
                     "device": editor.device.type}   # not its index: a rank's PNG is the unsharded run's, byte for byte
            return [png_writer(img, png_text(args, editor, {
                **edit_record(args, item.image, job.source, target, guidance, result.inversion, img, p2ps[item.id]),
                **extra})) for target, guidance, img in zip(job.targets, job.guidances, result.images)]

        def batches(todo):
            return batched.batches(todo, args.batch_size, lambda item: batched.kind(job(item, 0), args.method))
        return run.run(group, make, batches, args.quiet)


COMMANDS = {"edit": edit, "invert": invert, "regenerate": regenerate, "shift": shift, "recolor": recolor}
