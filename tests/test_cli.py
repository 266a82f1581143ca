"""The `efddpm` command, end to end, on a small random model written in the official single-file layout.

Subcommands run as real subprocesses (`python -m efddpm`); the bad-input cases call `main()` in-process (the
same code path, faster) and assert the one-line message, exit code 2 and that nothing was written.
"""
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from efddpm.app.cli import main
from efddpm.app.images import load_image, to_pil
from efddpm.app.editor import Editor

FAST = ["--steps", "12", "--skip", "4", "--quiet"]  # few steps: these tests check the plumbing, not the method


def efddpm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "efddpm", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def metadata(path: Path) -> dict:
    with Image.open(path) as img:
        return json.loads(img.text["efddpm"])


# ------------------------------------------------------------------------------------ every subcommand

def test_edit_writes_pngs_with_metadata_and_same_seed_gives_same_bytes(tmp_path, model, picture):
    runs = []
    for out in ("a", "b"):
        r = efddpm("edit", picture, "--source", "a red square", "--target", "a blue square", "--target",
                   "a red circle", "--cfg-tgt", "15", "7.5", "--seed", "7", "--grid", "--model", model,
                   "--out", tmp_path / out, *FAST)
        assert r.returncode == 0, r.stderr
        runs.append(sorted((tmp_path / out).iterdir()))
    assert [p.name for p in runs[0]] == ["red_1.png", "red_2.png", "red_grid.png"]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*runs))
    meta = metadata(runs[0][1])
    assert {k: meta[k] for k in ("source", "target", "cfg_src", "cfg_tgt", "steps", "skip", "eta", "seed")} == {
        "source": "a red square", "target": "a red circle", "cfg_src": 3.5, "cfg_tgt": 7.5, "steps": 12, "skip": 4,
        "eta": 1.0, "seed": 7}
    assert meta["model"] == str(model) and meta["resize"] == "48x40 -> central crop 40x40 -> resized 32x32"
    with Image.open(runs[0][2]) as grid:
        assert grid.size == (3 * 32, 32)  # input | two edits


def test_different_seeds_and_several_inversions(tmp_path, model, picture):
    r = efddpm("edit", picture, "--source", "a red square", "--target", "a blue square", "--num-inversions", "2",
               "--seed", "3", "--model", model, "--out", tmp_path, *FAST)
    assert r.returncode == 0, r.stderr
    a, b = tmp_path / "red_1_seed3.png", tmp_path / "red_1_seed4.png"
    assert metadata(a)["seed"] == 3 and metadata(b)["seed"] == 4
    diff = np.abs(np.asarray(Image.open(a), np.float64) - np.asarray(Image.open(b), np.float64)).mean()
    assert diff > 10   # other noise, another picture: measured 30 levels mean abs (PNG rounding alone moves <= 1)


def test_invert_then_regenerate_with_the_source_prompt_reconstructs(tmp_path, model, picture):
    code = tmp_path / "red.safetensors"
    r = efddpm("invert", picture, "--source", "a red square", "-o", code, "--seed", "0", "--model", model, *FAST[:2],
               "--quiet")
    assert r.returncode == 0, r.stderr
    r = efddpm("regenerate", code, "--target", "a red square", "--cfg-tgt", "3.5", "--skip", "0", "--out", tmp_path,
               "--quiet")  # the model is read from the code
    assert r.returncode == 0, r.stderr
    regenerated = np.asarray(Image.open(tmp_path / "red_1.png"), dtype=np.int16)
    editor = Editor.from_pretrained(str(model))
    x0, _ = editor.encode_image(picture)
    reconstruction = np.asarray(to_pil(editor.decode(x0))[0], dtype=np.int16)
    assert np.abs(regenerated - reconstruction).max() <= 1  # x_0 exact to ~1e-6; PNG rounding moves <= 1 level
    assert metadata(tmp_path / "red_1.png")["source"] == "a red square"


def test_shift_and_recolor(tmp_path, model, picture):
    r = efddpm("shift", picture, "--source", "a red square", "--dx", "2", "--seed", "1", "--model", model,
               "--out", tmp_path, *FAST[:2], "--quiet")
    assert r.returncode == 0, r.stderr
    assert metadata(tmp_path / "red_shift_0_2.png")["dx"] == 2
    mask = tmp_path / "mask.png"
    m = Image.new("L", (48, 40), 0)
    m.paste(255, (10, 8, 30, 28))                                  # the red square
    m.save(mask)
    r = efddpm("recolor", picture, "--source", "a red square", "--mask", mask, "--color", "#0000ff", "--t-range", "1",
               "6", "--seed", "1", "--model", model, "--out", tmp_path, *FAST[:2], "--quiet")
    assert r.returncode == 0, r.stderr
    assert metadata(tmp_path / "red_recolor.png")["color"] == "#0000ff"


@pytest.mark.parametrize("kind", ["json", "toml"])
def test_batch(tmp_path, model, picture, kind):
    entries = [{"image": str(picture), "source": "a red square", "targets": ["a blue square", "a red circle"]}]
    listing = tmp_path / f"edits.{kind}"
    if kind == "json":
        listing.write_text(json.dumps(entries))
    else:
        listing.write_text(f'[[edit]]\nimage = "{picture}"\nsource = "a red square"\n'
                           'targets = ["a blue square", "a red circle"]\n')
    r = efddpm("batch", listing, "--seed", "2", "--model", model, "--out", tmp_path / "out", *FAST)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.jsonl", "red_1.png", "red_2.png"]
    meta = metadata(tmp_path / "out" / "red_2.png")
    assert meta["target"] == "a red circle" and (meta["item_id"], meta["run"]["seed"]) == ("red", 2)


def test_long_prompt_warns_that_it_is_cut(tmp_path, model, picture, capsys):
    long = " ".join(["red"] * 90)
    assert main(["edit", str(picture), "--source", long, "--target", "x", "--model", str(model),
                 "--out", str(tmp_path), *FAST]) == 0
    assert "warning: prompt has 90 tokens, only the first 75 are used" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ bad input

def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is never reached)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def bad_inputs(tmp: Path, picture: Path, model: Path) -> dict:
    """name -> (argv, words the one-line message must contain)."""
    (tmp / "junk.png").write_bytes(b"this is not an image")
    good = picture.read_bytes()
    (tmp / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "huge.png").write_bytes(png_claiming(20000, 20000))
    Image.new("L", (10, 10), 255).save(tmp / "small-mask.png")
    (tmp / "a-file").write_text("x")
    (tmp / "out" / "red_1.png").parent.mkdir()
    (tmp / "out" / "red_1.png").write_bytes(b"keep me")
    (tmp / "out" / "code.safetensors").write_bytes(b"keep me too")
    edit = ["edit", str(picture), "--target", "a blue square", "--model", str(model), "--out", str(tmp / "new")]
    recolor = ["recolor", str(picture), "--color", "#00ff00", "--model", str(model), "--out", str(tmp / "new")]
    return {
        "missing image": (["edit", str(tmp / "nope.png"), "--target", "x", "--model", str(model)], "image not found"),
        "unreadable image (a folder)": (["edit", str(tmp), "--target", "x", "--model", str(model)], "not a file"),
        "not an image": (["edit", str(tmp / "junk.png"), "--target", "x", "--model", str(model)], "not an image"),
        "truncated image": (["edit", str(tmp / "truncated.png"), "--target", "x", "--model", str(model)], "damaged"),
        "zero-size image": (["edit", str(tmp / "empty.png"), "--target", "x", "--model", str(model)], "empty"),
        "gigantic image": (["edit", str(tmp / "huge.png"), "--target", "x", "--model", str(model)], "too large"),
        "missing mask": (recolor + ["--mask", str(tmp / "no-mask.png")], "mask not found"),
        "mask of the wrong size": (recolor + ["--mask", str(tmp / "small-mask.png")], "is 10x10, the image is 48x40"),
        "unknown model": (edit[:-4] + ["--model", str(tmp / "missing.safetensors"), "--out", str(tmp / "new")],
                          "no such file or folder"),
        "skip >= steps": (edit + ["--steps", "10", "--skip", "10"], "--skip must be in 0..9"),
        "steps < 1": (edit + ["--steps", "0"], "--steps must be in 1..999, got 0"),
        "negative source guidance": (edit + ["--cfg-src", "-1"], "--cfg-src must be in [0, 100], got -1"),
        "negative target guidance": (edit + ["--cfg-tgt", "-2"], "--cfg-tgt must be in [0, 100], got -2"),
        "eta above 1": (edit + ["--eta", "1.5"], "--eta must be in [0, 1]"),
        "eta below 0": (edit + ["--eta", "-0.1"], "--eta must be in [0, 1]"),
        "output folder is a file": (edit[:-1] + [str(tmp / "a-file" / "sub")], "is not a directory"),
        "output folder not writable": (edit[:-1] + ["/proc/efddpm-out"], "is not writable"),
        "existing output": (edit[:-1] + [str(tmp / "out")], "output exists"),
        "code file not .safetensors": (["invert", str(picture), "-o", str(tmp / "c.png"), "--model", str(model)],
                                       "-o must name a .safetensors file"),
        "existing code file": (["invert", str(picture), "-o", str(tmp / "out" / "code.safetensors"), "--model",
                                str(model)], "output exists"),
        "bad colour": (recolor + ["--mask", str(picture), "--color", "blue"], "--color must be"),
        "missing subcommand argument": (["edit", str(picture)], "the following arguments are required: --target"),
    }


@pytest.mark.parametrize("case", ["missing image", "unreadable image (a folder)", "not an image", "truncated image",
                                  "zero-size image", "gigantic image", "missing mask", "mask of the wrong size",
                                  "unknown model", "skip >= steps", "steps < 1", "negative source guidance",
                                  "negative target guidance", "eta above 1", "eta below 0", "output folder is a file",
                                  "output folder not writable", "existing output", "code file not .safetensors",
                                  "existing code file",
                                  "bad colour", "missing subcommand argument"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, picture, model, capsys, case):
    argv, words = bad_inputs(tmp_path, picture, model)[case]
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("efddpm: error: ") and words in err[0], err
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "out" / "red_1.png").read_bytes() == b"keep me"


def test_missing_embedded_model_without_model_flag(tmp_path, picture, capsys, monkeypatch):
    """An install without weights/ (not an editable one): a one-line error, never random weights."""
    monkeypatch.setattr("efddpm.app.cli.runner.DEFAULT_MODEL", tmp_path / "weights" / "efddpm-shapes.safetensors")
    assert main(["edit", str(picture), "--target", "x", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no --model given and the embedded model" in err[0] and "pass --model" in err[0]
    assert not (tmp_path / "out").exists()


def test_default_target_guidance_is_the_papers_for_other_models(tmp_path, model, picture):
    r = efddpm("edit", picture, "--source", "a red square", "--target", "a blue square", "--seed", "1", "--model",
               model, "--out", tmp_path, *FAST)
    assert r.returncode == 0, r.stderr
    assert metadata(tmp_path / "red_1.png")["cfg_tgt"] == 15.0


def test_model_not_cached_while_offline_as_a_real_process(tmp_path, picture):
    r = efddpm("edit", picture, "--target", "x", "--model", "stable-diffusion-v1-5/stable-diffusion-v1-5",
               "--out", tmp_path / "out", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"efddpm: error: stable-diffusion-v1-5/stable-diffusion-v1-5: no such local path, and as a hub repo "
        f"(revision main) it is not in the cache {tmp_path / 'cache'} and offline mode is on"]
    assert not (tmp_path / "out").exists()


def test_api_in_float64_keeps_the_whole_trajectory_in_float64(model, picture):
    """An auditing editor: x_0, x_t and the noise maps in float64, reconstruction to rounding (1e-12)."""
    editor = Editor.from_pretrained(str(model), dtype=torch.float64)
    code = editor.invert(picture, "a red square", steps=12, seed=0)
    assert code.xts.dtype == code.zs.dtype == torch.float64
    rec = editor.regenerate(code, "a red square", guidance=None, skip=0)
    assert rec.dtype == torch.float64 and (rec - code.xts[0]).abs().max() <= 1e-12


def test_api_accepts_pil_numpy_and_tensor_inputs(model, picture):
    editor = Editor.from_pretrained(str(model))
    pil = Image.open(picture)
    from_path, _ = editor.encode_image(picture)
    for image in (pil, np.array(pil), torch.from_numpy(np.array(pil)).permute(2, 0, 1) / 255):
        assert torch.allclose(editor.encode_image(image)[0], from_path, atol=1e-5)
    assert load_image(picture, 32)[0].shape == (1, 3, 32, 32)
