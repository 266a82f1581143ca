"""The promises a new user meets first: one set of defaults, latent codes and PNGs that say what they are,
reproducible batching, explicit randomness, a README whose first commands run offline, --help with defaults."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from efddpm.method import defaults
from efddpm.app.embedded import DEFAULT_MODEL
from efddpm.miniature import world
from efddpm.app.cli import DEFAULT_DEVICE, build_parser, main
from efddpm.app.fast import inversion_chunk
from efddpm.method.inversion import edit_friendly_inversion
from efddpm.method.latent_code import LatentCode
from efddpm.app.editor import Editor
from efddpm.method.scheduler import alphas_cumprod, timesteps

ROOT = Path(__file__).resolve().parents[1]


def metadata(path: Path) -> dict:
    with Image.open(path) as img:
        return json.loads(img.text["efddpm"])


# ------------------------------------------------------------------------------- one set of defaults

def test_defaults_scale_with_the_step_count():
    assert defaults.default_skip(100) == 36 and defaults.default_skip(20) == 7 and defaults.default_skip(1) == 0
    assert defaults.default_colour_range(100) == (1, 40) and defaults.default_colour_range(20) == (1, 8)


def test_every_command_runs_at_20_steps_with_the_scaled_defaults(tmp_path, model, picture):
    """Once `--steps 20` failed with `--skip must be in 0..19, got 36` (the CLI's own 36), in edit, recolor and
    regenerate alike, while the library's default_skip(20) was 7."""
    common = ["--model", str(model), "--seed", "0", "--quiet"]
    assert main(["edit", str(picture), "--target", "x", "--steps", "20", "--out", str(tmp_path), *common]) == 0
    assert metadata(tmp_path / "red_1.png")["skip"] == 7
    mask = tmp_path / "mask.png"
    m = Image.new("L", (48, 40), 0)
    m.paste(255, (10, 8, 30, 28))
    m.save(mask)
    assert main(["recolor", str(picture), "--mask", str(mask), "--color", "#0000ff", "--steps", "20", "--out",
                 str(tmp_path), *common]) == 0
    assert metadata(tmp_path / "red_recolor.png")["t_range"] == [1, 8]
    code = tmp_path / "red.safetensors"
    assert main(["invert", str(picture), "-o", str(code), "--steps", "20", *common]) == 0
    assert main(["regenerate", str(code), "--target", "x", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert metadata(tmp_path / "r" / "red_1.png")["skip"] == 7


def test_editor_and_functions_read_the_same_defaults(model, picture):
    editor = Editor.from_pretrained(str(model))
    code = editor.invert(picture, "a red square", steps=20, seed=0)
    assert code.settings["guidance"] == defaults.SOURCE_GUIDANCE and code.settings["eta"] == defaults.ETA
    assert editor.target_guidance == defaults.TARGET_GUIDANCE        # a model without its own recommendation
    plain = editor.edit(code, "x", output="tensor")
    explicit = editor.edit(code, "x", guidance=defaults.TARGET_GUIDANCE, skip=defaults.default_skip(20),
                           output="tensor")
    assert torch.equal(plain, explicit)


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="the embedded model is not present")
def test_the_embedded_models_target_guidance_comes_from_its_file():
    """2.5 travels in the file's metadata, so a copy under any name keeps it (once it was a path comparison)."""
    from efddpm import load
    assert load(DEFAULT_MODEL).defaults["target_guidance"] == 2.5 == world.MODEL_DEFAULTS["target_guidance"]


# ------------------------------------------------------------------------------- what a code and a PNG say

def test_a_latent_code_says_what_it_is(tmp_path, model, picture):
    """Once `invert --dtype bfloat16` wrote float32 tensors under settings["dtype"] = "bfloat16", and the CLI's
    record replaced the crop/resize note under "image" by the path."""
    path = tmp_path / "c.safetensors"
    assert main(["invert", str(picture), "-o", str(path), "--model", str(model), "--dtype", "bfloat16",
                 "--steps", "12", "--seed", "3", "--quiet"]) == 0
    code = LatentCode.load(path)
    assert code.zs.dtype == torch.float32 and code.settings["dtype"] == "float32"
    assert code.settings["model_dtype"] == "bfloat16"
    assert code.settings["image"] == "48x40 -> central crop 40x40 -> resized 32x32"
    assert code.settings["cli"]["image"] == str(picture) and code.settings["cli"]["model_dtype"] == "bfloat16"
    assert code.settings["seed"] == 3


def test_png_metadata_keeps_the_codes_settings_apart(tmp_path, model, picture):
    assert main(["edit", str(picture), "--target", "x", "--model", str(model), "--steps", "12", "--seed", "1",
                 "--out", str(tmp_path), "--quiet"]) == 0
    meta = metadata(tmp_path / "red_1.png")
    assert meta["image"] == str(picture) and meta["resize"] == "48x40 -> central crop 40x40 -> resized 32x32"
    assert meta["inversion"]["image"] == meta["resize"] and meta["inversion"]["dtype"] == "float32"
    assert meta["model_dtype"] == "float32" and "dtype" not in meta


# ------------------------------------------------------------------------------- reproducible batching

def test_inversion_chunk_depends_on_shapes_and_dtype_only(monkeypatch):
    """Once the chunk came from torch.cuda.mem_get_info: the batch composition, hence the fp16 output bits,
    depended on what else ran on the GPU."""
    def no_free_memory_reads(*args):
        raise AssertionError("inversion_chunk read the free memory")
    monkeypatch.setattr(torch.cuda, "mem_get_info", no_free_memory_reads)
    on_cuda = SimpleNamespace(device=torch.device("cuda"))
    assert inversion_chunk(on_cuda, 64, 2, torch.float16) == 16          # 32 samples per call
    assert inversion_chunk(on_cuda, 10, 2, torch.float16) == 10
    assert inversion_chunk(on_cuda, 64, 2, torch.float32) == 1           # exact Algorithm 1 in float32


def test_chunk_is_recorded_and_an_oversized_one_falls_back_to_the_same_draws(model, picture, monkeypatch):
    import efddpm.app.editor as pipeline
    editor = Editor.from_pretrained(str(model))
    plain = editor.invert(picture, "a red square", steps=12, seed=4)
    assert plain.settings["chunk"] == 1
    unet = editor.models.unet
    forward = unet.forward

    def small_batches_only(x, t, context):                   # a GPU on which a 4-step chunk does not fit
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(x, t, context)
    monkeypatch.setattr(unet, "forward", small_batches_only)
    monkeypatch.setattr(pipeline, "inversion_chunk", lambda *args: 4)
    monkeypatch.setattr(pipeline, "GraphedUNet", lambda unet: unet)
    editor.fast = True
    fallback = editor.invert(picture, "a red square", steps=12, seed=4)
    assert fallback.settings["chunk"] == 1
    assert torch.equal(fallback.zs, plain.zs) and torch.equal(fallback.xts, plain.xts)


# ------------------------------------------------------------------------------- explicit randomness

def test_editor_invert_takes_a_generator_or_the_noise_itself(tmp_path, model, picture):
    editor = Editor.from_pretrained(str(model))
    by_seed = editor.invert(picture, "a red square", steps=12, seed=9)
    by_generator = editor.invert(picture, "a red square", steps=12, generator=torch.Generator().manual_seed(9))
    assert torch.equal(by_seed.zs, by_generator.zs)
    x0, _ = editor.encode_image(picture)
    noise = torch.randn(12, *x0.shape, generator=torch.Generator().manual_seed(11))     # another program's draws
    code = editor.invert(picture, "a red square", steps=12, noise=noise)
    abar, ts = alphas_cumprod(), timesteps(12)
    for n in (1, 6, 12):                                                                  # eq. 6 with those draws
        expected = abar[ts[12 - n]].sqrt() * x0 + (1 - abar[ts[12 - n]]).sqrt() * noise[n - 1]
        assert torch.allclose(code.xts[n], expected, atol=1e-6)
    assert code.settings["noise"] == "explicit"
    # the command line takes the same draws from a file and writes the same code
    save_file({"noise": noise}, tmp_path / "noise.safetensors")
    path = tmp_path / "c.safetensors"
    assert main(["invert", str(picture), "--source", "a red square", "-o", str(path), "--noise",
                 str(tmp_path / "noise.safetensors"), "--model", str(model), "--steps", "12", "--quiet"]) == 0
    assert torch.equal(LatentCode.load(path).zs, code.zs)


def test_noise_file_of_the_wrong_shape_is_refused(tmp_path, capsys, model, picture):
    save_file({"noise": torch.zeros(3, 1, 4, 16, 16)}, tmp_path / "noise.safetensors")
    assert main(["invert", str(picture), "-o", str(tmp_path / "c.safetensors"), "--noise",
                 str(tmp_path / "noise.safetensors"), "--model", str(model), "--steps", "12", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["efddpm: error: noise must have shape [12, 1, 4, 16, 16] (steps, then the latent's), got "
                   "[3, 1, 4, 16, 16]"]
    assert not (tmp_path / "c.safetensors").exists()


# ------------------------------------------------------------------------------- the README and --help

def quick_start() -> list[str]:
    """The commands of the README's first code block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S)[1]
    lines, current = [], ""
    for line in block.splitlines():
        current += line.split(" #")[0].rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [line for line in lines if line]


def test_readme_quick_start_is_two_commands_that_run_offline(tmp_path):
    """The first command installs and edits the shipped picture with the embedded model; the second runs the
    tests. Here the edit runs as written (offline, an empty hub cache), writing into a temporary folder."""
    commands = quick_start()
    assert len(commands) == 2 and commands[1] == "python -m pytest -q", commands
    edit = next(part for part in commands[0].split("&&") if "efddpm edit" in part)
    argv = shlex.split(edit)
    argv[argv.index("--out") + 1] = str(tmp_path)
    assert not any(a.startswith("--model") for a in argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    r = subprocess.run([sys.executable, "-m", "efddpm", *argv[1:]], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written, r.stderr


def test_help_shows_the_defaults():
    helps = {name: p.format_help() for name, p in build_parser()._subparsers._group_actions[0].choices.items()}
    text = " ".join(helps["edit"].split())
    for flag, default in (("--steps", "100"), ("--eta", "1.0"), ("--cfg-src", "3.5"), ("--device", DEFAULT_DEVICE)):
        assert re.search(rf"{flag} \S+ .*?\(default: {default}\)", text), flag
    assert "36 of 100, scaled to --steps" in text
