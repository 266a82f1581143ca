"""Where the seconds of a cold `efddpm edit` go: the command itself from process start to PNG (weights on disk, read
once before so they sit in the page cache, as on a machine that used them lately), and the same job in phases in a
fresh process, cumulative seconds: import torch, import efddpm, CUDA context, a first few kernels, the single file
read to the GPU alone (then dropped), read + build the models, the first edit (cuDNN/cuBLAS kernel choice, CUDA graph
capture), a warm edit, the PNG.

The checkpoint: SD1.x-sized random weights in fp16, the original single-file layout (2.1 GB), and the same models
as a diffusers folder. The job: benchmarks/speed.py's reference edit (512x512, 100 steps, skip 36, 3.5 / 15).

    python benchmarks/cold_start.py --json cold.json     # on a GPU
    python benchmarks/cold_start.py --tree /tmp/before   # also an older efddpm (git archive REV efddpm | tar -x -C
                                                         # /tmp/before), alternating with this checkout
    python benchmarks/cold_start.py --first-edit         # first, the first edit against a warm one, phase by phase,
                                                         # in fresh processes (FIRST_EDIT below)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE, TARGET = "a photo of a cat sitting on a sofa", "a photo of a dog sitting on a sofa"

# One process, phase by phase (sys.argv: model, image, output PNG); prints one JSON line of cumulative seconds.
PHASES = r"""
import time; start = time.perf_counter()
import json, sys
marks = {}
def mark(name):
    marks[name] = round(time.perf_counter() - start, 3)
import torch; mark("import_torch")
import efddpm.__main__
from efddpm import Editor; mark("import_efddpm")
torch.cuda.init(); torch.empty(1, device="cuda"); mark("cuda_context")
(torch.ones(4, device="cuda") * 2).half().sum().item(); mark("first_kernels")
from pathlib import Path
from efddpm.checkpoint.tensors import read_tensors
if Path(sys.argv[1]).is_file():            # the single file's read alone (load_models reads it again)
    tensors = read_tensors(Path(sys.argv[1]), torch.device("cuda"))[0]; torch.cuda.synchronize(); del tensors
    mark("read_file_to_gpu")
editor = Editor.from_pretrained(sys.argv[1], device="cuda", dtype=torch.float16); torch.cuda.synchronize()
mark("load_models")
def edit():
    code = editor.invert(sys.argv[2], %(source)r, steps=100, guidance=3.5, seed=0, skip=36)
    return editor.edit(code, %(target)r, guidance=15.0, skip=36)
image, = edit(); torch.cuda.synchronize(); mark("first_edit")
image, = edit(); torch.cuda.synchronize(); mark("warm_edit")
image.save(sys.argv[3]); mark("png")
print(json.dumps(marks))
""" % {"source": SOURCE, "target": TARGET}

# The first edit against a warm one, phase by phase (sys.argv: model, image, mode), in a fresh process. mode "plain";
# "ops": first a few single ops of each library the networks use, each timed (its first call loads the library's
# kernels); "background": the same ops in a thread while the main thread loads the models; "profile": the first
# round under cProfile, with the calls of most host time. Prints one JSON line.
FIRST_EDIT = r"""
import time; start = time.perf_counter()
import json, sys, threading
from pathlib import Path
model, picture, mode = sys.argv[1:4]
marks = {}
def timed(name, fn):
    torch.cuda.synchronize(); t = time.perf_counter(); out = fn(); torch.cuda.synchronize()
    marks[name] = round(time.perf_counter() - t, 4)
    return out
import torch
import torch.nn.functional as F
from efddpm import Editor
torch.cuda.init(); torch.empty(1, device="cuda"); marks["cuda_context_at"] = round(time.perf_counter() - start, 3)
def ops(record):
    h, c = dict(device="cuda", dtype=torch.float16), torch.channels_last
    x = torch.randn(2, 320, 64, 64, **h).to(memory_format=c)
    w3, w1 = torch.randn(320, 320, 3, 3, **h).to(memory_format=c), torch.randn(640, 320, 1, 1, **h).to(memory_format=c)
    q = torch.randn(2, 8, 4096, 40, **h)
    a, b = torch.randn(154, 768, **h), torch.randn(768, 768, **h)
    for name, fn in (("linear", lambda: F.linear(a, b)), ("conv3x3", lambda: F.conv2d(x, w3, padding=1)),
                     ("conv1x1", lambda: F.conv2d(x, w1)), ("group_norm", lambda: F.group_norm(x, 32)),
                     ("silu", lambda: F.silu(x)), ("sdpa", lambda: F.scaled_dot_product_attention(q, q, q)),
                     ("layer_norm", lambda: F.layer_norm(a, (768,))), ("gelu", lambda: F.gelu(a)),
                     ("upsample", lambda: F.interpolate(x, scale_factor=2.0, mode="nearest"))):
        record(f"op_{name}", fn)
thread = None
if mode == "ops":
    ops(timed)
elif mode == "background":
    thread = threading.Thread(target=ops, args=(lambda name, fn: fn(),)); thread.start()
editor = timed("load_models", lambda: Editor.from_pretrained(model, device="cuda", dtype=torch.float16))
if thread is not None:
    timed("join_background_ops", thread.join)
profiler = None
if mode == "profile":                       # which calls the first round's host time goes to
    import cProfile, pstats
    profiler = cProfile.Profile(); profiler.enable()
for run in ("first", "warm"):
    timed(f"{run}_encode_image", lambda: editor.encode_image(picture))
    timed(f"{run}_encode_prompts", lambda: editor.encode_prompts(["", %(source)r]))
    code = timed(f"{run}_invert", lambda: editor.invert(picture, %(source)r, steps=100, guidance=3.5, seed=0, skip=36))
    latents = timed(f"{run}_regenerate", lambda: editor.regenerate(code, %(target)r, guidance=15.0, skip=36))
    timed(f"{run}_decode", lambda: editor.decode(latents))
    if run == "first":
        marks["first_edit_done_at"] = round(time.perf_counter() - start, 3)
        if profiler is not None:
            profiler.disable()
            stats = pstats.Stats(profiler).stats              # (file, line, name) -> (calls, _, tottime, cumtime, _)
            top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:12]
            marks["first_round_host_seconds_by_call"] = {f"{Path(k[0]).name}:{k[1]}({k[2]})": round(v[2], 3)
                                                         for k, v in top}
    timed(f"{run}_invert_and_edit", lambda: editor.invert_and_edit(picture, %(source)r, %(target)r, steps=100,
          source_guidance=3.5, guidance=15.0, skip=36, seed=0))
print(json.dumps(marks))
""" % {"source": SOURCE, "target": TARGET}


def write_checkpoints(folder: Path) -> dict[str, Path]:
    """The random fp16 SD1.x models as a single file and (where diffusers is installed: it writes it) as a diffusers
    folder of the same sizes; and a 512x512 picture."""
    import numpy as np
    import torch
    from PIL import Image
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from efddpm.checkpoint import save_single_file
    from speed import efddpm_models
    models = efddpm_models(torch.float16)
    checkpoints = {"single_file": folder / "sd1-random-fp16.safetensors"}
    save_single_file(checkpoints["single_file"], models.unet, models.vae, models.text_encoder)
    del models
    try:
        import diffusers
        import transformers
    except ImportError:
        print("diffusers or transformers missing: the single file only", file=sys.stderr)
    else:
        from models_util import (diffusers_unet_config, diffusers_vae_config, transformers_clip_config,
                                 write_tokenizer_folder)
        from efddpm import CLIPTextConfig, UNetConfig, VAEConfig
        from efddpm.method.scheduler import SD1, diffusers_config
        out = checkpoints["diffusers_folder"] = folder / "sd1-random-diffusers"
        for sub, model in (("unet", diffusers.UNet2DConditionModel(**diffusers_unet_config(UNetConfig()))),
                           ("vae", diffusers.AutoencoderKL(**diffusers_vae_config(VAEConfig()))),
                           ("text_encoder", transformers.CLIPTextModel(transformers_clip_config(CLIPTextConfig())))):
            model.half().save_pretrained(out / sub)
        write_tokenizer_folder(out / "tokenizer")
        (out / "scheduler").mkdir()
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(diffusers_config(SD1)))
        (out / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(folder / "cat.png")
    return checkpoints


def environment(tree: Path) -> dict:
    """The environment of a process that imports the efddpm of `tree` first."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}


def command_seconds(model: Path, folder: Path, tree: Path) -> float:
    cmd = [sys.executable, "-m", "efddpm", "edit", str(folder / "cat.png"), "--source", SOURCE, "--target", TARGET,
           "--model", str(model), "--out", str(folder / "out"), "--seed", "0", "--quiet", "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env=environment(tree))
    if proc.returncode:
        sys.exit(f"efddpm edit failed: {proc.stderr[-2000:]}")
    return round(time.perf_counter() - start, 3)


def script_marks(script: str, args: list, tree: Path, what: str, **env) -> dict:
    """Run one of the scripts above in a fresh process importing the efddpm of `tree`; its JSON line, and the
    process's whole time."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, cwd=tree,
                          env={**environment(tree), **env})
    total = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{what} failed: {proc.stderr[-2000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_total": round(total, 3)}


def phases(model: Path, folder: Path, tree: Path) -> dict:
    return script_marks(PHASES, [model, folder / "cat.png", folder / "p.png"], tree, "the phases")


def first_edit(model: Path, folder: Path, mode: str, tree: Path, **env) -> dict:
    return script_marks(FIRST_EDIT, [model, folder / "cat.png", mode], tree, "the first-edit breakdown", **env)


def first_edit_rows(res: dict, model: Path, folder: Path, before: Path | None) -> None:
    """The first edit against a warm one, phase by phase, in fresh processes, in this order: plain, twice (is the
    first process on a machine slower?); after single ops of each library, each timed; plain again; with those ops in
    a thread beside the loading; plain with CUDA's lazy loading off (every kernel loaded with the context). With
    `before` (an older efddpm), those rows run it, and this checkout's plain rows are interleaved."""
    old = before or ROOT
    runs = [("plain", "plain", old, {}), ("plain_again", "plain", old, {}), ("ops_first", "ops", old, {}),
            ("plain_third", "plain", old, {}), ("ops_in_background", "background", old, {}),
            ("eager_module_loading", "plain", old, {"CUDA_MODULE_LOADING": "EAGER"})]
    if before is not None:
        for at, name in ((2, "this_checkout"), (4, "this_checkout_again"), (6, "this_checkout_third")):
            runs.insert(at, (name, "plain", ROOT, {}))
    for name, mode, tree, env in runs:
        res[f"first_edit_{name}"] = first_edit(model, folder, mode, tree, **env)
        print(json.dumps({name: res[f"first_edit_{name}"]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--tree", type=Path, help="also time the efddpm package in this folder")
    parser.add_argument("--first-edit", action="store_true", help="first, the first edit's breakdown (single file)")
    parser.add_argument("--profile-first-edit", type=int, default=0, metavar="N",
                        help="first, N fresh processes whose first edit runs under cProfile (host time by call)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoints = write_checkpoints(folder)
        for path in folder.rglob("*.safetensors"):
            path.read_bytes()                                       # into the page cache
        for run in range(args.profile_first_edit):
            res[f"first_edit_profiled_{run}"] = first_edit(folder / "sd1-random-fp16.safetensors", folder, "profile", ROOT)
            print(json.dumps({run: res[f"first_edit_profiled_{run}"]}), flush=True)
        if args.first_edit:
            first_edit_rows(res, folder / "sd1-random-fp16.safetensors", folder, args.tree and args.tree.resolve())
        trees = {"": ROOT, **({"before_": args.tree.resolve()} if args.tree else {})}
        for name, model in checkpoints.items():
            for _ in range(args.runs):                              # alternating the trees
                for label, tree in trees.items():
                    res.setdefault(f"{label}{name}_command_s", []).append(command_seconds(model, folder, tree))
            for label, tree in trees.items():
                res[f"{label}{name}_phases_s"] = phases(model, folder, tree)
            print(json.dumps({k: v for k, v in res.items() if name in k}), flush=True)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
