"""Dataset editing throughput: the batched engine (efddpm.app.batched) against the sequential single-edit loop, in
ONE process, on one GPU or (under torchrun) on several.

The job: the reference edit (benchmarks/speed.py: 512x512, SD1.x-sized networks with random weights, fp16, 100 steps,
eta 1, guidance 3.5 / 15, skip 36, one target) on different random pictures, each with its own seed. Prints edits/s
of the sequential loop (Editor.invert + Editor.edit per picture: what `efddpm batch` did before the engine) and of
the engine at each K (K pictures per batch), the ratio to the sequential loop, and the peak GPU memory; --compile-ks
adds the engine with the UNet under torch.compile (fullgraph; after the eager rows, with its compile time).

    python benchmarks/dataset_throughput.py                                  # K = 1, 4, 8, 16, 32, eager
    python benchmarks/dataset_throughput.py --ks 16 --compile-ks 64          # and compiled at K = 64
    torchrun --standalone --nproc-per-node 2 benchmarks/dataset_throughput.py --ks 32 --skip-sequential
    python benchmarks/dataset_throughput.py --cli --ks 32 --items 128        # `efddpm batch` itself, 1 GPU and all

Under torchrun every rank edits its own pictures on cuda:LOCAL_RANK; the ranks start each timing together (a
barrier) and the edits/s are all ranks' edits over the slowest rank's time. --cli runs the command line end to end
(a random SD1.x single file written first, then `python -m efddpm batch` on one GPU and `torchrun -m efddpm batch` with
a rank per visible GPU, one too, wall time from process start, and the manifests checked: every item once).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from efddpm import Editor  # noqa: E402
from efddpm.app.batched import Job, Settings, edit_batch  # noqa: E402
from efddpm.checkpoint import save_single_file  # noqa: E402

from speed import SKIP, SOURCE, STEPS, TARGET, W_SRC, W_TGT, efddpm_models  # noqa: E402

SETTINGS = Settings(STEPS, W_SRC, 1.0, SKIP)
DEVICE = "cuda"   # of the command line's runs


def pictures(n: int, seed: int) -> list[Image.Image]:
    gen = np.random.default_rng(seed)
    return [Image.fromarray(gen.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(n)]


def jobs(n: int, first: int) -> list[Job]:
    return [Job(img, SOURCE, [TARGET], [W_TGT], first + i) for i, img in enumerate(pictures(n, first))]


class Ranks:
    """torchrun's ranks (one process: rank 0 of 1): barriers and the slowest rank's time."""

    def __init__(self):
        self.size, self.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        if self.size > 1:
            import torch.distributed as dist
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group("nccl")

    def barrier(self):
        if self.size > 1:
            import torch.distributed as dist
            dist.barrier(device_ids=[torch.cuda.current_device()])

    def slowest(self, seconds: float) -> float:
        if self.size == 1:
            return seconds
        import torch.distributed as dist
        box = torch.tensor([seconds], device="cuda")
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return float(box)


def rate(ranks: Ranks, work, edits_per_rank: int) -> tuple[float, float]:
    """(edits/s over all ranks, peak GiB of this rank) of one warm timing of work()."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ranks.barrier()
    start = time.perf_counter()
    work()
    torch.cuda.synchronize()
    seconds = ranks.slowest(time.perf_counter() - start)
    return edits_per_rank * ranks.size / seconds, torch.cuda.max_memory_allocated() / 2**30


def engine_rows(res: dict, editor: Editor, ranks: Ranks, ks: list[int], label: str) -> None:
    for k in ks:
        batches = max(1, 8 // k)                                       # at least 8 edits per rank and timing
        work = [jobs(k, 10_000 * ranks.rank + 100 * k + b) for b in range(batches)]
        edit_batch(editor, work[0], SETTINGS)                          # warm-up: CUDA graphs (and compile) per shape
        per_s, peak = rate(ranks, lambda: [edit_batch(editor, w, SETTINGS) for w in work], k * batches)
        res[f"{label}_K{k}_edits_per_s"], res[f"{label}_K{k}_peak_GiB"] = round(per_s, 3), round(peak, 2)
        if "sequential_edits_per_s" in res:
            res[f"{label}_K{k}_vs_sequential"] = round(per_s / res["sequential_edits_per_s"], 2)
        if ranks.rank == 0:
            print(f"{label} K={k}: {per_s:.3f} edits/s, peak {peak:.2f} GiB", file=sys.stderr, flush=True)


def sequential_row(res: dict, editor: Editor, ranks: Ranks) -> None:
    work = jobs(8, 10_000 * ranks.rank + 99)

    def loop(work):
        for job in work:
            code = editor.invert(job.image, job.source, steps=SETTINGS.steps, guidance=W_SRC, seed=job.seed,
                                 skip=SETTINGS.skip)
            editor.edit(code, job.targets, guidance=job.guidances, skip=SETTINGS.skip)
    loop(work[:1])
    per_s, peak = rate(ranks, lambda: loop(work), len(work))
    res["sequential_edits_per_s"], res["sequential_peak_GiB"] = round(per_s, 3), round(peak, 2)


def cli_rows(res: dict, ks: list[int], items: int) -> None:
    """`efddpm batch` end to end on one GPU and on all (torchrun), wall time from process start."""
    gpus = torch.cuda.device_count()
    models = efddpm_models(torch.float16)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "sd1-random.safetensors"
        save_single_file(model, models.unet, models.vae, models.text_encoder)
        del models
        torch.cuda.empty_cache()
        (tmp / "pics").mkdir()
        entries = []
        for i, img in enumerate(pictures(items, 1)):
            img.save(tmp / "pics" / f"p{i:04d}.png")
            entries.append({"image": f"pics/p{i:04d}.png", "source": SOURCE, "targets": [TARGET]})
        (tmp / "edits.json").write_text(json.dumps(entries))
        for k in ks:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
            for name, launcher in (("1gpu", [sys.executable]), (f"torchrun{gpus}", torchrun)):
                out = tmp / f"out-{k}-{name}"
                cmd = [*launcher, "-m", "efddpm", "batch", str(tmp / "edits.json"), "--model", str(model), "--device", DEVICE,
                       "--out", str(out), "--seed", "0", "--cfg-tgt", str(W_TGT), "--batch-size", str(k), "--quiet"]
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                wall = time.perf_counter() - start
                key = f"cli_K{k}_{name}"
                if proc.returncode:
                    res[f"{key}_error"] = proc.stderr[-3000:]
                    continue
                lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
                done = sorted(line["id"] for line in lines if line["kind"] == "output")
                summary = [line for line in lines if line["kind"] == "summary"][-1]
                res[f"{key}_wall_s"] = round(wall, 2)
                res[f"{key}_edits_per_s_wall"] = round(items / wall, 3)
                res[f"{key}_edits_per_s_run"] = round(items / summary["seconds"], 3)   # after loading the model
                res[f"{key}_every_item_once"] = done == sorted(e["image"][5:-4] for e in entries)
                print(f"{key}: {wall:.1f} s wall, {items / summary['seconds']:.3f} edits/s after loading",
                      file=sys.stderr, flush=True)
            one, many = (res.get(f"cli_K{k}_{name}_edits_per_s_run") for name in ("1gpu", f"torchrun{gpus}"))
            if one and many:
                res[f"cli_K{k}_torchrun{gpus}_vs_1gpu"] = round(many / one, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,4,8,16,32", help="batch sizes of the eager engine (comma-separated)")
    parser.add_argument("--compile-ks", default="", help="batch sizes of the engine with the UNet compiled")
    parser.add_argument("--skip-sequential", action="store_true", help="no sequential-loop row")
    parser.add_argument("--cli", action="store_true", help="`efddpm batch` end to end instead (1 GPU and all)")
    parser.add_argument("--items", type=int, default=128, help="--cli: pictures in the dataset")
    parser.add_argument("--json", help="also write the results here (rank 0)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/dataset_throughput.py needs a CUDA GPU")
    ks = [int(k) for k in args.ks.split(",") if k]
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "float16"}
    if args.cli:
        cli_rows(res, ks, args.items)
    else:
        ranks = Ranks()
        res["gpus"] = ranks.size
        models = efddpm_models(torch.float16)
        models.unet.to(memory_format=torch.channels_last)
        editor = Editor(models, torch.float16, fast=True)
        if not args.skip_sequential:
            sequential_row(res, editor, ranks)
        engine_rows(res, editor, ranks, ks, "eager")
        if args.compile_ks:
            start = time.perf_counter()
            editor.models.unet = torch.compile(models.unet, fullgraph=True)
            editor.graphed_unet = None                                 # graphs of the compiled UNet from here on
            engine_rows(res, editor, ranks, [int(k) for k in args.compile_ks.split(",")], "compiled")
            res["compiled_rows_s_with_compile"] = round(time.perf_counter() - start, 1)
        if ranks.rank != 0:
            return
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
