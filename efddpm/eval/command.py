"""`efddpm eval`: measure the edits of result folders, and optionally make them first (a sweep).

    efddpm eval runs/ef-skip36 runs/ef-skip24 --dataset edits.json --out scores/            # folders of efddpm batch
    efddpm eval --pair inputs/ edits/ --prompts targets.json --metrics paper --out scores/  # a pair of folders
    efddpm eval --dataset edits.json --methods edit-friendly,ddim+p2p --sweep skip=24,36 cfg-tgt=7.5,15 \\
        --out sweep/                   # efddpm batch into sweep/runs/<method>_skip24_cfg-tgt7.5 ..., then eval

Writes to --out: scores.jsonl (every edit's scores, appended as they come; a rerun reuses the scores of the same
bytes, input, prompt, region and metric weights, so an interrupted evaluation resumes), and, all or nothing at the
end, table.json, table.csv, table.md and tradeoff.png (efddpm.eval.report). The metrics (efddpm.eval.scoring) and
their networks are checked and loaded before any work. A sweep runs `efddpm batch` once per method and setting,
one run after another in this process (each resumable; all share one seed, drawn and printed if not given); for
several GPUs run the batches under torchrun first and evaluate their folders (docs/evaluation.md).
"""
from __future__ import annotations

import hashlib
import itertools
import math
import random
from pathlib import Path

import torch

from efddpm.app.cli import main as efddpm_main
from efddpm.app.cli.inputs import check_output_folder
from efddpm.app.dataset_run import note, progress
from efddpm.app.datasets import read_dataset
from efddpm.app.manifest import Appender, json_objects
from efddpm.core.atomic import Outputs
from efddpm.core import checks
from efddpm.core.checks import InputError
from efddpm.eval.clip_score import DEFAULT_CLIP
from efddpm.eval.report import Run, rows, table_csv, table_json, table_text, tradeoff_plot
from efddpm.eval.runs import pair_edits, run_edits
from efddpm.eval.scoring import METRICS, NEEDS_REGION, PAPER, PIE_BENCH, Extra, Scorers, Weights, metric_names

SCORES = "scores.jsonl"
METHODS = ("edit-friendly", "native", "ddim", "sdedit", "edit-friendly+p2p", "native+p2p", "ddim+p2p")
SWEEPABLE = {"skip": int, "cfg-tgt": float, "cfg-src": float, "xa": float, "sa": float}
PASSED = ("model", "dtype", "steps", "batch-size", "size", "device", "image-root")   # eval's flags given to batch


def add_parser(commands) -> None:
    """The `eval` subcommand, on the `efddpm` command's subparsers."""
    eval_flags(commands.add_parser("eval", help="measure edits (CLIP score, LPIPS, PIE-Bench's metrics): tables "
                                                "and the trade-off plot"))


def eval_flags(p) -> None:
    """The arguments of `efddpm eval` (also those of python -m efddpm.miniature.tradeoff)."""
    p.add_argument("runs", nargs="*", metavar="RUN", help="folders written by efddpm batch, one method and setting each")
    p.add_argument("--pair", nargs=2, action="append", metavar=("INPUTS", "EDITS"),
                   help="a folder of edits, each measured against the picture of its name in INPUTS (repeatable)")
    p.add_argument("--prompts", metavar="JSON", help="--pair's target prompts: a JSON object, file name -> prompt")
    p.add_argument("--dataset", metavar="FILE", help="the edit list the runs were made from: its masks and "
                                                     "PIE-Bench annotations (edit types) are used")
    p.add_argument("--image-root", metavar="DIR", help="the folder the dataset's image paths are relative to")
    p.add_argument("--metrics", help=f"comma-separated, of {', '.join(METRICS)}; or pie-bench ({', '.join(PIE_BENCH)})"
                                     f", paper ({', '.join(PAPER)}) (default: pie-bench for PIE-Bench's file, else "
                                     "paper)")
    p.add_argument("--clip", default=DEFAULT_CLIP, help="CLIP model: hub id or folder (default: %(default)s)")
    p.add_argument("--lpips-net", choices=["alex", "vgg", "squeeze"], default="alex",
                   help="backbone of the lpips metric (bg_lpips is squeeze, as PIE-Bench) (default: %(default)s)")
    p.add_argument("--lpips-backbone", metavar="FILE", help="torchvision checkpoint of that backbone (default: torch "
                                                            "hub's cache)")
    p.add_argument("--lpips-heads", metavar="FILE", help="LPIPS' linear heads (default: those torchmetrics ships)")
    p.add_argument("--dino", metavar="FILE", help="DINO ViT-B/8 weights (default: torch hub's cache)")
    p.add_argument("--plot", nargs=2, metavar=("X", "Y"), default=("lpips", "clip"),
                   help="the trade-off plot's axes (default: lpips clip, the paper's)")
    p.add_argument("--out", required=True, help="folder for scores.jsonl, table.json, table.csv, table.md, "
                                                "tradeoff.png (and a sweep's runs/)")
    p.add_argument("--device", help="where the metric networks (and a sweep's edits) run (default: cuda if any)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    g = p.add_argument_group("sweep", "make the runs first with efddpm batch (needs --dataset)")
    g.add_argument("--methods", help=f"comma-separated, of {', '.join(METHODS)}")
    g.add_argument("--sweep", nargs="+", metavar="KEY=V,V", help=f"settings to sweep, of {', '.join(SWEEPABLE)}")
    for flag in ("model", "dtype", "steps", "seed", "batch-size", "size"):                # PASSED, and the seed
        g.add_argument(f"--{flag}", help="passed to efddpm batch")


def sweep_grid(args) -> list[tuple[str, list[tuple[str, str]]]]:
    """(method, [(flag, value), ...]) for every method and point of the sweep, checked."""
    if args.methods is None:
        if args.sweep:
            raise InputError("--sweep needs --methods")
        return []
    if args.dataset is None:
        raise InputError("--methods needs --dataset: the edit list to run them on")
    methods = [m.strip() for m in args.methods.split(",")]
    for m in methods:
        if m not in METHODS:
            raise InputError(f"--methods: unknown method {m!r} (known: {', '.join(METHODS)})")
    axes = {}
    for spec in args.sweep or []:
        key, _, values = spec.partition("=")
        if key not in SWEEPABLE:
            raise InputError(f"--sweep: cannot sweep {key!r} (sweepable: {', '.join(SWEEPABLE)})")
        if key in axes:
            raise InputError(f"--sweep: {key} given twice")
        try:
            axes[key] = [str(SWEEPABLE[key](v)) for v in values.split(",")]
        except ValueError:
            raise InputError(f"--sweep: {spec!r} is not {key}=value,value,...") from None
    points = [list(zip(axes, values)) for values in itertools.product(*axes.values())]
    return [(m, point) for m in methods for point in points]


def run_name(method: str, point: list[tuple[str, str]]) -> str:
    return "_".join([method] + [f"{key}{value}" for key, value in point])


def make_runs(args, grid, folder: Path) -> list[Path]:
    """efddpm batch once per method and point, into folder/runs/<run_name>; stops at the first run that fails as a
    whole (its error has been printed)."""
    seed = args.seed if args.seed is not None else str(random.SystemRandom().randrange(2 ** 31))
    note(args.quiet, f"sweep: {len(grid)} runs, seed {seed}")
    given = [(f"--{flag}", getattr(args, flag.replace("-", "_"))) for flag in PASSED]
    passed = [x for flag, value in given if value is not None for x in (flag, str(value))]
    runs = []
    for method, point in grid:
        out = folder / "runs" / run_name(method, point)
        base, p2p = method.removesuffix("+p2p"), method.endswith("+p2p")
        argv = ["batch", args.dataset, "--out", str(out), "--seed", str(seed), "--method", base, *["--p2p"][:p2p],
                *passed, *[x for key, value in point for x in (f"--{key}", value)], *["--quiet"][:args.quiet]]
        note(args.quiet, f"sweep: efddpm {' '.join(argv)}")
        if efddpm_main(argv) == 2:
            raise InputError(f"sweep: the run {out.name} failed (above); its earlier runs are in {folder / 'runs'}")
        runs.append(out)
    return runs


def chosen_metrics(args, extra: tuple[str, ...], pie: bool) -> tuple[str, ...]:
    """--metrics (default: pie-bench for PIE-Bench's file, else paper), checked with --plot's axes among them."""
    metrics = metric_names(args.metrics, extra) if args.metrics is not None else PIE_BENCH if pie else PAPER
    for axis in args.plot:
        if axis not in metrics:
            raise InputError(f"--plot: {axis} is not among the metrics ({', '.join(metrics)}); choose with --plot X Y")
    return metrics


def finite(value: float):
    return value if math.isfinite(value) else str(value)           # JSON has no NaN / inf: "nan", "inf"


def evaluate(args, extra: Extra | None = None) -> int:
    """The eval subcommand: returns the exit status. extra: metrics of the caller's own, by name (Scorers)."""
    grid = sweep_grid(args)
    if not args.runs and not args.pair and not args.methods:
        raise InputError("eval: give result folders (RUN ...), --pair INPUTS EDITS, or --methods to make runs")
    if args.prompts is not None and not args.pair:
        raise InputError("--prompts goes with --pair")
    items = read_dataset(args.dataset, image_root=args.image_root, image_root_name="--image-root") \
        if args.dataset is not None else None
    metrics = chosen_metrics(args, tuple(extra or ()), items is not None and any(item.pie is not None for item in items))
    regional = [m for m in metrics if m in NEEDS_REGION]
    if regional and not any(item.pie is not None or item.mask is not None for item in items or []):
        raise InputError(f"{regional[0]} needs the edited region, and no edit has one: give --dataset, PIE-Bench's "
                         "mapping file or a batch list with masks")
    folder = Path(args.out)
    check_output_folder(folder)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    checks.device(args.device, "--device")
    by_id = {item.id: item for item in items} if items is not None else None
    runs, edits = [], []

    def add_run(path: Path) -> None:
        if any(Path(run.name).resolve() == path.resolve() for run in runs):
            raise InputError(f"the run {path} is given twice")
        found, settings, missing = run_edits(path, by_id)
        runs.append(Run(str(path), settings, missing))
        edits.append(found)
    for path in args.runs:
        add_run(Path(path))
    for sources, pair in args.pair or []:
        runs.append(Run(pair, {}))
        edits.append(pair_edits(Path(sources), Path(pair), Path(args.prompts) if args.prompts else None))
    scorers = Scorers.load(metrics, Weights(args.clip, args.lpips_net, args.lpips_backbone, args.lpips_heads,
                                            args.dino), args.device, extra)       # before a sweep's hours of work
    for path in make_runs(args, grid, folder) if grid else []:
        add_run(path)
    score_all(folder, scorers, runs, edits, args.quiet)
    table = rows(runs, metrics)
    plot = tradeoff_plot(table, runs, *args.plot)
    with Outputs(overwrite=True) as out:
        out.write(folder / "table.json", lambda tmp: tmp.write_text(table_json(table, metrics), encoding="utf-8"))
        out.write(folder / "table.csv", lambda tmp: tmp.write_text(table_csv(table, metrics), encoding="utf-8"))
        out.write(folder / "table.md", lambda tmp: tmp.write_text(table_text(table, metrics), encoding="utf-8"))
        if plot is not None:
            out.write(folder / "tradeoff.png", lambda tmp: plot.save(tmp, format="PNG"))
    if plot is None:
        note(args.quiet, f"no tradeoff.png: no run has finite {args.plot[0]} and {args.plot[1]}")
    print(table_text(table, metrics), end="")
    return 0


def score_all(folder: Path, scorers: Scorers, runs: list[Run], edits: list[list], quiet: bool) -> None:
    """Every edit's scores into its run, reusing scores.jsonl's lines where they still hold, appending new ones."""
    config = scorers.config()
    known: dict[tuple, dict] = {}
    for line in read_scores(folder):
        known.setdefault(line_key(line), {}).update(
            {m: (line["config"].get(m), float(v)) for m, v in line["scores"].items()})
    book = Appender(folder / SCORES)
    try:
        with progress(sum(map(len, edits)), quiet, None) as bar:
            for run, found in zip(runs, edits):
                for edit in found:
                    source, picture = edit.pictures()                             # uint8 [3, S, S] each
                    region = edit.region(picture.shape[-1])                       # [S, S] or None
                    sig = "none" if region is None else hashlib.sha256(region.numpy().tobytes()).hexdigest()[:16]
                    line = {"run": run.name, "key": edit.key, "digest": edit.digest, "source": str(edit.source),
                            "target": edit.target, "region": sig}
                    old = known.get(line_key(line), {})
                    scores = {m: v for m, (c, v) in old.items() if m in config and c == config[m]}
                    todo = tuple(m for m in scorers.metrics if m not in scores)
                    if todo:
                        new = scorers.score(source, picture, edit.target, region, todo, edit)
                        book.append({**line, "kind": "scores", "config": {m: config[m] for m in todo},
                                     "scores": {m: finite(v) for m, v in new.items()}})
                        scores.update(new)
                    run.scores.append({m: scores[m] for m in scorers.metrics})
                    run.edit_types.append(edit.edit_type)
                    bar.update(1)
    finally:
        book.close()


def line_key(line: dict) -> tuple:
    return tuple(line.get(k) for k in ("run", "key", "digest", "source", "target", "region"))


def read_scores(folder: Path) -> list[dict]:
    """The well-formed lines of folder/scores.jsonl (a torn last line is skipped, and cut by the next append)."""
    path = folder / SCORES
    return [line for line in json_objects(path) if line.get("kind") == "scores" and isinstance(line.get("scores"),
            dict) and isinstance(line.get("config"), dict)] if path.is_file() else []
