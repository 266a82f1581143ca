"""How long a PIE-Bench row takes: `efddpm batch` on PIE-Bench's mapping file, then `efddpm eval` with PIE-Bench's
metrics and the paper's LPIPS, end to end from process start, every network SD1.x- or official-sized with random
weights (the real ones cannot be had offline; the work is the same).

Writes a synthetic PIE-Bench into a temporary folder: --items 512 x 512 random pictures (annotation_images/) and a
mapping_file.json with bracketed prompts, edit types 0..9 and a box mask each (run-length encoded as PIE-Bench's);
a random SD1.x single file; a random CLIP ViT-L/14 (transformers' folder layout); random DINO ViT-B/8 and LPIPS
(alex, squeeze) backbones under the official file names in a torch hub cache (TORCH_HOME), where eval looks for them
(LPIPS' heads: those torchmetrics ships).
Prints the seconds of each command and the edits per second, with the eval's per-edit time.

    python benchmarks/eval_pie_bench.py --items 64                 # on a GPU (PIE-Bench's 700: x 700 / 64)
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
sys.path.insert(0, str(ROOT / "tests"))
from efddpm.checkpoint import save_single_file  # noqa: E402
from efddpm.eval.dino import DINO_VITB8, DinoViT  # noqa: E402
from efddpm.eval.lpips import NETS, Backbone  # noqa: E402
from models_util import write_tokenizer_folder  # noqa: E402
from speed import efddpm_models  # noqa: E402

PROMPTS = [("a [cat] sitting on a bench", "a [dog] sitting on a bench"),
           ("a photo of a [red] car", "a photo of a [blue] car")]


def box_rle(rng, side: int = 512) -> list[int]:
    """A random box as PIE-Bench's run-length encoding: [start, length] per row, row-major."""
    x0, y0 = rng.integers(32, side // 2, 2)
    w, h = rng.integers(64, side // 2, 2)
    return [int(v) for y in range(y0, y0 + h) for v in (y * side + x0, w)]


def synthetic_pie_bench(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (folder / "annotation_images").mkdir(parents=True)
    mapping = {}
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(folder / "annotation_images" /
                                                                                  f"{i:03d}.jpg", quality=95)
        source, target = PROMPTS[i % len(PROMPTS)]
        mapping[f"{i:09d}"] = {"image_path": f"{i:03d}.jpg", "original_prompt": source, "editing_prompt": target,
                               "editing_instruction": "edit it", "editing_type_id": str(i % 10),
                               "blended_word": "", "mask": box_rle(rng)}
    (folder / "mapping_file.json").write_text(json.dumps(mapping))
    return folder / "mapping_file.json"


def random_weights(folder: Path) -> Path:
    """A CLIP ViT-L/14 folder; DINO and LPIPS files in folder/torch/hub/checkpoints (returned: the TORCH_HOME)."""
    import transformers
    torch.manual_seed(0)
    clip = write_tokenizer_folder(folder / "clip-vit-large-patch14")
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14), projection_dim=768)
    transformers.CLIPModel(config).save_pretrained(clip)
    transformers.CLIPProcessor(image_processor=transformers.CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(clip)).save_pretrained(clip)
    hub = folder / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(DinoViT(DINO_VITB8).state_dict(), hub / "dino_vitbase8_pretrain.pth")
    for net in ("alex", "squeeze"):                                 # LPIPS' heads: those torchmetrics ships
        torch.save(Backbone(net).state_dict(), hub / NETS[net][0])
    return folder / "torch"


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} failed: {proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "items": args.items,
           "torch": torch.__version__, "dtype": "float16"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mapping = synthetic_pie_bench(tmp / "pie", args.items)
        models = efddpm_models(torch.float16)
        save_single_file(tmp / "sd1-random.safetensors", models.unet, models.vae, models.text_encoder)
        del models
        torch_home = random_weights(tmp)
        env = {**os.environ, "TORCH_HOME": str(torch_home), "HF_HUB_OFFLINE": "1"}
        run = tmp / "run"
        res["batch_s"] = timed([sys.executable, "-m", "efddpm", "batch", str(mapping), "--image-root",
                                str(tmp / "pie" / "annotation_images"), "--model", str(tmp / "sd1-random.safetensors"),
                                "--out", str(run), "--seed", "0", "--batch-size", str(args.batch_size), "--quiet"], env)
        res["eval_s"] = timed([sys.executable, "-m", "efddpm", "eval", str(run), "--dataset", str(mapping),
                               "--image-root", str(tmp / "pie" / "annotation_images"), "--metrics", "pie-bench,lpips",
                               "--clip", str(tmp / "clip-vit-large-patch14"), "--lpips-net", "alex",
                               "--out", str(tmp / "scores"),
                               "--quiet"], env)
        table = json.loads((tmp / "scores" / "table.json").read_text())
        res["rows"] = len(table["rows"])
        res["edits_scored"] = table["rows"][0]["edits"]
    res["batch_edits_per_s"] = round(args.items / res["batch_s"], 3)
    res["eval_s_per_edit"] = round(res["eval_s"] / args.items, 4)
    res["pie_bench_700_minutes"] = round(700 * (res["batch_s"] + res["eval_s"]) / args.items / 60, 1)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
