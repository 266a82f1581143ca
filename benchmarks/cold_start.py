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


def phases(model: Path, folder: Path, tree: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PHASES, str(model), str(folder / "cat.png"), str(folder / "p.png")],
                          capture_output=True, text=True, cwd=tree, env=environment(tree))
    total = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"the phases failed: {proc.stderr[-2000:]}")
    marks = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**marks, "process_total": round(total, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--tree", type=Path, help="also time the efddpm package in this folder")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoints = write_checkpoints(folder)
        for path in folder.rglob("*.safetensors"):
            path.read_bytes()                                       # into the page cache
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
