"""The reference edit timed with two versions of efddpm, one process each, alternating, on the same GPU: does a change
cost time where it should cost nothing? (E.g. the attention-control API: the plain edit before and after it.)

The job is benchmarks/speed.py's: SD1.x-sized random weights (seed 0), fp16, the fast path, a 512x512 image, 100 steps,
skip 36, guidance 3.5 / 15; the median of 7 warm edits per process. Each tree is a folder holding an `efddpm`
package, e.g. one written by `git archive REV efddpm | tar -x -C /tmp/before`. Also prints a checksum of each output,
so that a change meant to leave the numbers alone can be seen to.

    python benchmarks/edit_time_by_tree.py /tmp/before .          # before vs this checkout, 2 rounds
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

# speed.py's job, restated against the API every tree since the fast path has (speed.py's efddpm_edit passes p2p=,
# which older trees' Editor.edit does not take), and run with the tree's efddpm first on sys.path.
ONE_PROCESS = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
from PIL import Image
import efddpm
from efddpm import AutoencoderKL, CLIPTextModel, CLIPTokenizer, Editor, StableDiffusionModels, UNet
torch.manual_seed(0)
with torch.device("cuda"):
    unet, vae, text = UNet(), AutoencoderKL(), CLIPTextModel()
models = [m.half().eval().requires_grad_(False) for m in (unet, vae, text)]
models[0].to(memory_format=torch.channels_last)
editor = Editor(StableDiffusionModels(*models, CLIPTokenizer.bundled(), None, None, "random"), torch.float16, fast=True)
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))

def edit():
    code = editor.invert(image, "a photo of a cat sitting on a sofa", steps=100, guidance=3.5, seed=0, skip=36)
    return editor.edit(code, "a photo of a dog sitting on a sofa", guidance=15.0, skip=36, output="tensor")

edit()
times = []
for _ in range(7):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = edit()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
print(json.dumps({"package": efddpm.__file__, "median_s": float(np.median(times)),
                  "checksum": float(out.float().abs().sum())}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="folder holding the baseline's efddpm package")
    parser.add_argument("after", type=Path, help="folder holding the efddpm package to compare")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name in results:
            tree = getattr(args, name).resolve()
            proc = subprocess.run([sys.executable, "-c", ONE_PROCESS, str(tree)], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{tree}: {proc.stderr.strip().splitlines()[-1]}")
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(name, results[name][-1], flush=True)
    best = {name: min(r["median_s"] for r in rs) for name, rs in results.items()}
    same = {r["checksum"] for rs in results.values() for r in rs}
    print(f"after / before: {best['after'] / best['before']:.4f} (best medians {best['before']:.4f} s, "
          f"{best['after']:.4f} s); outputs {'identical' if len(same) == 1 else 'differ'}")


if __name__ == "__main__":
    main()
