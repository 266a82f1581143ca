"""Bad input never crashes and never lies: one case per class of input that once ended in a traceback or a
silently wrong output.

Command line: exit code 2, one line `efddpm: error: ...` naming the problem, no traceback, nothing written.
API: the exception type (InputError, a ValueError) and the same words. The small random model of conftest.py
serves most cases; the embedded shapes model those that depend on its architecture (picture sides).
"""
import errno
import json
import os
import re
import stat
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from efddpm.app.embedded import DEFAULT_MODEL
from efddpm.miniature import world
from efddpm.core.atomic import OutputError, Outputs
from efddpm.core.checks import InputError
from efddpm.app.cli import main
from efddpm.app.images import ImageError, LargeImageWarning, open_image
from efddpm.method.latent_code import LatentCode
from efddpm.app.editor import Editor

FAST = ["--steps", "12", "--skip", "4", "--quiet"]
EMBEDDED = DEFAULT_MODEL


def run_cli(capsys, argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def tree(folder: Path) -> list:
    return sorted((str(p.relative_to(folder)), p.is_dir()) for p in folder.rglob("*"))


def assert_refused(capsys, argv, words, folder: Path):
    before = tree(folder)
    code, err = run_cli(capsys, argv)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("efddpm: error: ") and words in err[0], err
    assert "Traceback" not in err[0]
    assert tree(folder) == before


# ------------------------------------------------------------------------------- latent codes, damaged

@pytest.fixture(scope="module")
def code_file(tmp_path_factory, model, picture) -> Path:
    """A genuine latent code of the small model, inverted for edits with skip >= 4 (12 steps)."""
    path = tmp_path_factory.mktemp("codes") / "red.safetensors"
    assert main(["invert", str(picture), "--source", "a red square", "-o", str(path), "--seed", "0", "--model",
                 str(model), "--steps", "12", "--quiet"]) == 0
    editor = Editor.from_pretrained(str(model))
    code = editor.invert(picture, "a red square", steps=12, skip=4, seed=0)
    code.settings["model"] = str(model)
    code.save(path.with_name("skip4.safetensors"))
    return path


def altered(code_file: Path, folder: Path, change) -> Path:
    """A copy of the code file whose settings (a dict) went through change(settings) (or tensors, a dict)."""
    with safe_open(code_file, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    settings = json.loads(meta["efddpm.latent_code"])
    change(settings, tensors)
    path = folder / "altered.safetensors"
    save_file(tensors, path, metadata={"efddpm.latent_code": json.dumps(settings)})
    return path


def delete(key):
    return lambda s, t: s.pop(key)


def setting(key, value):
    return lambda s, t: s.__setitem__(key, value)


CODE_DAMAGE = {   # name -> (change, words of the message)
    "eta deleted": (delete("eta"), "settings lack 'eta'"),
    "method deleted": (delete("method"), "settings lack 'method'"),
    "schedule deleted": (delete("schedule"), "settings lack 'schedule'"),
    "skip deleted": (delete("skip"), "settings lack 'skip'"),
    "num_steps altered": (setting("num_steps", 50), "zs is [12, 1, 4, 16, 16]"),
    "eta not a number": (setting("eta", "one"), "setting 'eta' has the wrong type"),
    "eta out of range": (setting("eta", 2.0), "eta must be in [0, 1]"),
    "guidance NaN": (setting("guidance", "NaN"), "setting 'guidance' has the wrong type"),
    "unknown schedule kind": (setting("schedule", {"kind": "cosine"}), "bad settings"),
    "dtype altered": (setting("dtype", "float16"), "expected [1, 4, 16, 16] torch.float16"),
    "method unknown": (setting("method", "magic"), "unknown method 'magic'"),
    "tensor missing": (lambda s, t: t.pop("zs"), "is not an efddpm latent code"),
    "noise map NaN": (lambda s, t: t["zs"][3].fill_(float("nan")), "NaN or infinite"),
    "timesteps altered": (lambda s, t: t["timesteps"].add_(1), "not the 12-step grid"),
    "schedule of negative length": (lambda s, t: s["schedule"].update(num_train_timesteps=-5), "not a training schedule"),
    "guidance list longer than the batch": (setting("guidance", [1.0, 2.0, 3.0]), "takes one value or one per prompt"),
}
CODE_FOR_ANOTHER_MODEL = {   # codes that load, but that this model cannot regenerate
    "latents of three dims": (lambda s, t: [t.update({k: t[k][..., 0].contiguous() for k in ("x_T", "zs", "xts")})],
                              "this model's are [B, 4, h, w]"),
    "two inversions for one target": (lambda s, t: [t.update({k: torch.cat([t[k], t[k]], dim=-4)
                                                              for k in ("x_T", "zs", "xts")})],
                                      "the code holds 2 inversions and there are 1 prompts"),
}


@pytest.mark.parametrize("case", list(CODE_DAMAGE))
def test_regenerate_refuses_a_damaged_latent_code(tmp_path, capsys, code_file, case):
    change, words = CODE_DAMAGE[case]
    path = altered(code_file, tmp_path, change)
    assert_refused(capsys, ["regenerate", path, "--target", "x", "--out", tmp_path / "out", "--quiet"], words, tmp_path)
    with pytest.raises(InputError, match=re.escape(words)):
        LatentCode.load(path)


@pytest.mark.parametrize("case", list(CODE_FOR_ANOTHER_MODEL))
def test_regenerate_refuses_a_code_the_model_cannot_run(tmp_path, capsys, code_file, case):
    change, words = CODE_FOR_ANOTHER_MODEL[case]
    path = altered(code_file, tmp_path, change)
    assert_refused(capsys, ["regenerate", path, "--target", "x", "--skip", "4", "--out", tmp_path / "out", "--quiet"],
                   words, tmp_path)


def test_regenerate_refuses_p2p_flags_without_p2p_and_words_the_codes_prompt_lacks(tmp_path, capsys, code_file):
    argv = ["regenerate", code_file, "--target", "a blue square", "--skip", "4", "--out", tmp_path / "out", "--quiet"]
    assert_refused(capsys, argv + ["--sa", "0.5"], "--sa needs --p2p", tmp_path)
    assert_refused(capsys, argv + ["--p2p", "--blend", "circle"], "--blend word 'circle' is not a word of the source "
                   "or target prompts ('a red square' | 'a blue square')", tmp_path)


def test_regenerate_below_the_codes_inverted_skip(tmp_path, capsys, code_file):
    path = code_file.with_name("skip4.safetensors")
    assert_refused(capsys, ["regenerate", path, "--target", "x", "--skip", "2", "--out", tmp_path, "--quiet"],
                   "--skip must be at least 4 for this latent code", tmp_path)
    with pytest.raises(InputError, match="skip must be at least 4"):
        Editor.from_pretrained(LatentCode.load(path).settings["model"]).edit(LatentCode.load(path), "x", skip=2)


# ------------------------------------------------------------------------------- the command line

def cli_cases(tmp: Path, picture: Path, model: Path) -> dict:
    """name -> (argv, words of the one-line message)."""
    black = tmp / "black-mask.png"
    Image.new("L", (48, 40), 0).save(black)
    clear = tmp / "clear-mask.png"
    Image.new("RGBA", (48, 40), (255, 255, 255, 0)).save(clear)
    (tmp / "edits.csv").write_text("image,source,targets\nred.png,a,b\n")
    (tmp / "unknown-key.json").write_text(json.dumps([{"image": str(picture), "source": "a", "targets": ["b"],
                                                       "guidance": 3}]))
    entry = {"image": str(picture), "source": "a red square", "targets": ["a blue square"]}
    for name, extra in (("xa-without-p2p", {"xa": 0.5}), ("blend-cow", {"p2p": True, "blend": ["cow"]}),
                        ("p2p-yes", {"p2p": "yes"}), ("reweight-list", {"p2p": True, "reweight": ["blue", 2]})):
        (tmp / f"{name}.json").write_text(json.dumps([{**entry, **extra}]))
    base = ["edit", picture, "--source", "a red square", "--target", "x", "--model", model, "--out", tmp / "out"]
    edit = base + FAST
    embedded = ["edit", picture, "--target", "x", "--out", tmp / "out", *FAST]
    recolor = ["recolor", picture, "--color", "#0000ff", "--t-range", "1", "6", "--model", model, "--out", tmp / "out",
               *FAST[:2], "--quiet"]
    shift = ["shift", picture, "--model", model, "--out", tmp / "out", *FAST[:2], "--quiet"]
    batch = lambda name: ["batch", tmp / f"{name}.json", "--model", model, "--out", tmp / "out", *FAST]
    return {
        # silent wrong outputs
        "target guidance NaN": (edit + ["--cfg-tgt", "nan"], "--cfg-tgt must be a finite number, got nan"),
        "source guidance inf": (edit + ["--cfg-src", "inf"], "--cfg-src must be a finite number, got inf"),
        "target guidance 1e30": (edit + ["--cfg-tgt", "1e30"], "--cfg-tgt must be in [0, 100], got 1e+30"),
        "strength NaN": (recolor + ["--mask", picture, "--strength", "nan"], "--strength must be a finite number"),
        "all-black mask": (recolor + ["--mask", black], "the mask marks nothing"),
        "transparent mask": (recolor + ["--mask", clear], "the mask marks nothing"),
        # tracebacks
        "1000 steps": (base + ["--steps", "1000", "--quiet"], "--steps must be in 1..999, got 1000"),
        "size 24 on the embedded model": (embedded + ["--size", "24"], "--size must be a multiple of 16"),
        "size 8 on the embedded model": (embedded + ["--size", "8"], "--size must be a multiple of 16"),
        "size 40 on the embedded model": (embedded + ["--size", "40"], "--size must be a multiple of 16"),
        "size 2048 on the embedded model": (embedded + ["--size", "2048"], "--size 2048 needs about"),
        "size 100000 on the embedded model": (embedded + ["--size", "100000"], "--size 100000 needs about"),
        "device bogus": (edit + ["--device", "bogus"], "--device 'bogus' is not a device"),
        "compile on the CPU": (edit + ["--compile", "--device", "cpu"], "--compile needs a CUDA --device, got cpu"),
        "seed beyond 64 bits": (edit + ["--seed", "99999999999999999999999"], "--seed must be in 0.."),
        "shift beyond the picture": (shift + ["--dx", "99999999999999999999999"], "--dx must be in -15..15"),
        "output name is a folder, with --overwrite": (["edit", picture, "--target", "x", "--model", model, "--out",
                                                      tmp, "--overwrite", *FAST], "is a folder"),
        # rough edges
        "batch file of unknown type": (["batch", tmp / "edits.csv", "--model", model], "unknown type '.csv'"),
        "unknown key in a batch entry": (["batch", tmp / "unknown-key.json", "--model", model],
                                         "entry 1 has unknown key 'guidance'"),
        # Prompt-to-Prompt
        "--xa without --p2p": (edit + ["--xa", "0.5"], "--xa needs --p2p"),
        "--blend without --p2p": (edit + ["--blend", "red"], "--blend needs --p2p"),
        "xa above 1": (edit + ["--p2p", "--xa", "1.5"], "--xa must be in [0, 1], got 1.5"),
        "sa NaN": (edit + ["--p2p", "--sa", "nan"], "--sa must be a finite number, got nan"),
        "blend word in neither prompt": (edit + ["--p2p", "--blend", "red", "cow"],
                                         "--blend word 'cow' is not a word of the source or target prompts"),
        "reweight word missing from the target": (edit + ["--p2p", "--reweight", "red=2"],
                                                  "--reweight word 'red' is not a word of the target prompt 'x'"),
        "reweight without a scale": (edit + ["--p2p", "--reweight", "x"], "--reweight must be WORD=SCALE"),
        "reweight scale inf": (edit + ["--p2p", "--reweight", "x=inf"], "--reweight x must be a finite number"),
        "reweight with no cross window": (edit + ["--p2p", "--reweight", "x=2", "--xa", "0"],
                                          "--xa must be above 0"),
        "p2p with several inversions": (edit + ["--p2p", "--num-inversions", "2"], "--p2p edits one inversion"),
        "xa in a batch entry without p2p": (batch("xa-without-p2p"), "entry 1: xa needs p2p"),
        "blend word missing in a batch entry": (batch("blend-cow"), "entry 1: blend word 'cow' is not a word"),
        "p2p not a bool in a batch entry": (batch("p2p-yes"), "entry 1: p2p must be true or false, got 'yes'"),
        "reweight not a table in a batch entry": (batch("reweight-list"), "entry 1: reweight must map words to scales"),
    }


CLI_CASES = ["target guidance NaN", "source guidance inf", "target guidance 1e30", "strength NaN", "all-black mask",
             "transparent mask", "1000 steps", "size 24 on the embedded model", "size 8 on the embedded model",
             "size 40 on the embedded model", "size 2048 on the embedded model", "size 100000 on the embedded model",
             "device bogus", "compile on the CPU", "seed beyond 64 bits", "shift beyond the picture",
             "output name is a folder, with --overwrite", "batch file of unknown type", "unknown key in a batch entry",
             "--xa without --p2p", "--blend without --p2p", "xa above 1", "sa NaN", "blend word in neither prompt",
             "reweight word missing from the target", "reweight without a scale", "reweight scale inf",
             "reweight with no cross window", "p2p with several inversions", "xa in a batch entry without p2p",
             "blend word missing in a batch entry", "p2p not a bool in a batch entry",
             "reweight not a table in a batch entry"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_refuses(tmp_path, capsys, picture, model, case):
    if "embedded" in case and not EMBEDDED.is_file():
        pytest.skip(f"{EMBEDDED} not present")
    argv, words = cli_cases(tmp_path, picture, model)[case]
    if case.startswith("output name is a folder"):
        Image.open(picture).save(tmp_path / "pic.png")
        (tmp_path / "pic_1.png").mkdir()
        argv[1] = tmp_path / "pic.png"
    assert_refused(capsys, argv, words, tmp_path)


# ------------------------------------------------------------------------------- all or nothing

def test_disk_full_after_the_first_png_leaves_nothing(tmp_path, capsys, picture, model, monkeypatch):
    """ENOSPC while writing the second of two PNGs: neither appears, no temporary file is left."""
    import efddpm.app.cli.runner
    real, calls = efddpm.app.cli.runner.png_writer, []

    def writer(img, metadata):
        write = real(img, metadata)

        def fill(tmp):
            calls.append(tmp)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            write(tmp)
        return fill
    monkeypatch.setattr(efddpm.app.cli.runner, "png_writer", writer)
    out = tmp_path / "out"
    code, err = run_cli(capsys, ["edit", picture, "--target", "a", "--target", "b", "--model", model, "--out", out,
                                 *FAST])
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert len(calls) == 2 and list(out.iterdir()) == []


def test_a_folder_in_the_way_of_the_second_png_is_refused_before_any_work(tmp_path, capsys, picture, model):
    (tmp_path / "red_2.png").mkdir()
    for extra in ([], ["--overwrite"]):
        assert_refused(capsys, ["edit", picture, "--target", "a", "--target", "b", "--model", model, "--out", tmp_path,
                                *FAST, *extra], "red_2.png is a folder", tmp_path)


def test_replacing_a_file_never_leaves_its_name_empty(tmp_path, monkeypatch):
    """With overwrite the old file is kept under a second name and replaced in one rename: at no moment is the
    final name missing (a crash there would lose the old file and give no new one)."""
    import efddpm.core.atomic as atomic
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    seen = []   # does the final name exist after each rename or link of the commit?

    def watched(real):
        def call(src, dst):
            real(src, dst)
            seen.append(path.exists())
        return call
    monkeypatch.setattr(atomic.os, "replace", watched(os.replace))
    monkeypatch.setattr(atomic.os, "link", watched(os.link))
    atomic.write_atomically(path, lambda tmp: tmp.write_bytes(b"new"))
    assert path.read_bytes() == b"new" and seen and all(seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_one_command_cannot_write_a_name_twice(tmp_path):
    out = Outputs(overwrite=True)
    out.write(tmp_path / "a.png", lambda tmp: tmp.write_bytes(b"1"))
    with pytest.raises(OutputError, match="written twice"):
        out.write(tmp_path / "a.png", lambda tmp: tmp.write_bytes(b"2"))
    out.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_batch_that_fails_midway_says_what_it_kept(tmp_path, capsys, picture, model, monkeypatch):
    second = tmp_path / "blue.png"
    Image.open(picture).save(second)
    listing = tmp_path / "edits.json"
    listing.write_text(json.dumps([{"image": str(picture), "targets": ["a"]}, {"image": str(second), "targets": ["b"]}]))
    import efddpm.app.batched as batched
    calls, real = [], batched.edit_batch

    def edit_then_fail(*args, **kwargs):     # the second batch (of one item: the CPU's default size)
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)
    monkeypatch.setattr(batched, "edit_batch", edit_then_fail)
    code, err = run_cli(capsys, ["batch", listing, "--model", model, "--out", tmp_path / "out", "--seed", "0", *FAST])
    assert code == 2 and len(err) == 1 and "out of memory" in err[0], err
    assert "1 of 2 entries were finished and written" in err[0] and "nothing was written" not in err[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.jsonl", "red_1.png"]


def test_a_colour_manipulation_on_a_guided_code_warns_on_the_command_line(tmp_path, capsys, picture):
    if not EMBEDDED.is_file():
        pytest.skip(f"{EMBEDDED} not present")
    code, err = run_cli(capsys, ["recolor", picture, "--source", "a red square", "--mask", picture, "--color",
                                 "#0000ff", "--cfg-src", "3.5",
                                 "--steps", "6", "--out", tmp_path, "--quiet"])
    assert code == 0 and any("inverted with source guidance 3.5" in line for line in err), err


def test_two_runs_never_silently_replace_each_other(tmp_path):
    """A name created by another run between the check and the move: the move fails, the other file stays,
    and what this run had already placed is taken back."""
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    out = Outputs(overwrite=False)
    out.write(first, lambda tmp: tmp.write_bytes(b"mine 1"))
    out.write(second, lambda tmp: tmp.write_bytes(b"mine 2"))
    second.write_bytes(b"the other run's")
    with pytest.raises(OutputError, match="another run wrote it meanwhile"):
        out.commit()
    assert not first.exists() and second.read_bytes() == b"the other run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png"]


def test_overwrite_is_all_or_nothing_too(tmp_path):
    """With overwrite, a failure after replacing the first file puts the old one back."""
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(b"old")
    out = Outputs(overwrite=True)
    out.write(first, lambda tmp: tmp.write_bytes(b"new"))
    out.write(second, lambda tmp: tmp.write_bytes(b"new 2"))
    second.mkdir()                         # appears meanwhile: the move of b.png fails
    with pytest.raises(OutputError, match="is a folder"):
        out.commit()
    assert first.read_bytes() == b"old" and second.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_interrupted_batch_says_what_was_kept_and_the_rerun_finishes_it(tmp_path, capsys, picture, model,
                                                                         monkeypatch):
    second = tmp_path / "blue.png"
    Image.open(picture).save(second)
    listing = tmp_path / "edits.json"
    listing.write_text(json.dumps([{"image": str(picture), "targets": ["a"]}, {"image": str(second), "targets": ["b"]}]))
    import efddpm.app.batched as batched
    calls, real = [], batched.edit_batch

    def edit_then_stop(*args, **kwargs):     # the second batch (of one item: the CPU's default size)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(batched, "edit_batch", edit_then_stop)
    out = tmp_path / "out"
    code, err = run_cli(capsys, ["batch", listing, "--model", model, "--out", out, "--seed", "0", *FAST])
    assert code == 130 and err == [f"efddpm: interrupted; 1 of 2 entries were finished and written (listed in "
                                   f"{out / 'manifest.jsonl'}); rerun the same command to do the rest"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl", "red_1.png"]
    rerun = []
    monkeypatch.setattr(batched, "edit_batch", lambda *args, **kwargs: rerun.append(1) or real(*args, **kwargs))
    first = (out / "red_1.png").read_bytes()
    code, err = run_cli(capsys, ["batch", listing, "--model", model, "--out", out, "--seed", "0", *FAST])
    assert code == 0 and err == [] and rerun == [1]   # the rerun does only what was left
    assert sorted(p.name for p in out.iterdir()) == ["blue_1.png", "manifest.jsonl", "red_1.png"]
    assert (out / "red_1.png").read_bytes() == first


def test_interrupted_message_starts_its_own_line(tmp_path, capsys, picture, model, monkeypatch):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(Editor, "edit", stop)
    code = main([str(a) for a in ["edit", picture, "--target", "x", "--model", model, "--out", tmp_path,
                                  "--steps", "12", "--skip", "4"]])   # not --quiet: the progress bar is drawn
    err = capsys.readouterr().err
    assert code == 130
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last == "efddpm: interrupted; nothing was written", repr(err[-200:])


# ------------------------------------------------------------------------------- metadata and modes

def test_grid_metadata_records_every_seed_and_guidance(tmp_path, picture, model):
    assert main([str(a) for a in ["edit", picture, "--target", "a", "--target", "b", "--cfg-tgt", "7.5", "3.5",
                                  "--num-inversions", "3", "--seed", "5", "--grid", "--model", model, "--out",
                                  tmp_path, *FAST]]) == 0
    with Image.open(tmp_path / "red_grid.png") as img:
        meta = json.loads(img.text["efddpm"])
    assert [(t["seed"], t["target"], t["cfg_tgt"]) for t in meta["tiles"]] == [
        (s, t, g) for s in (5, 6, 7) for t, g in (("a", 7.5), ("b", 3.5))]
    assert [inv["seed"] for inv in meta["inversions"]] == [5, 6, 7]


def test_outputs_get_the_umask_mode(tmp_path, picture, model):
    old = os.umask(0o027)
    try:
        assert main([str(a) for a in ["edit", picture, "--target", "a", "--model", model, "--out", tmp_path,
                                      *FAST]]) == 0
        assert main([str(a) for a in ["invert", picture, "-o", tmp_path / "c.safetensors", "--model", model,
                                      *FAST[:2], "--quiet"]]) == 0
    finally:
        os.umask(old)
    for name in ("red_1.png", "c.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


@pytest.mark.skipif(not EMBEDDED.is_file(), reason=f"{EMBEDDED} not present")
def test_a_copy_of_the_embedded_model_keeps_its_target_guidance(tmp_path):
    copy = tmp_path / "my-copy.safetensors"
    copy.write_bytes(EMBEDDED.read_bytes())
    assert Editor.from_pretrained(str(copy)).target_guidance == 2.5 != 15.0   # the model's own, not SD's


def test_large_image_warning_is_one_line_of_ours_once(tmp_path, capsys, model, monkeypatch):
    """Within our limit but past Pillow's decompression-bomb threshold: one line of ours, however often the
    image is opened, instead of Pillow's raw warning two or three times."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)      # a 48x40 picture is "large" for the test
    path = tmp_path / "big.png"
    Image.new("RGB", (48, 40), (200, 10, 10)).save(path)
    assert main([str(a) for a in ["edit", path, "--target", "x", "--model", model, "--out", tmp_path / "o",
                                  *FAST]]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert err == [f"efddpm: warning: {path} is 48x40 (0 megapixels): decoding it takes time and memory"], err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        open_image(path)
    assert [w.category for w in caught] == [LargeImageWarning]


# ------------------------------------------------------------------------------- the API

@pytest.fixture(scope="module")
def editor(model):
    return Editor.from_pretrained(str(model))


@pytest.fixture(scope="module")
def api_code(editor, picture):
    return editor.invert(picture, "a red square", steps=12, seed=0)


def test_api_refuses_non_finite_and_out_of_range_numbers(editor, picture, api_code):
    for kwargs, words in (({"guidance": float("nan")}, "guidance must be a finite number"),
                          ({"guidance": 1e30}, "guidance must be in [0, 100]"),
                          ({"guidance": [1.0, 2.0, 3.0]}, "guidance takes one value or one per prompt (2)"),
                          ({"skip": 12}, "skip must be in 0..11"),
                          ({"eta": 1.5}, "eta must be in [0, 1]")):
        with pytest.raises(InputError, match=re.escape(words)):
            editor.edit(api_code, ["a", "b"], **kwargs)
    for kwargs, words in (({"seed": 2 ** 70}, "seed must be in 0.."), ({"steps": 1000}, "steps must be in 1..999"),
                          ({"guidance": float("inf")}, "guidance must be a finite number"),
                          ({"eta": 0.0}, "eta must be above 0: the edit-friendly inversion divides by sigma_t"),
                          ({"seed": 1, "noise": torch.zeros(12, 1, 4, 16, 16)}, "at most one of seed, generator"),
                          ({"noise": torch.zeros(11, 1, 4, 16, 16)}, "noise must have shape [12, 1, 4, 16, 16]")):
        with pytest.raises(InputError, match=re.escape(words)):
            editor.invert(picture, "a red square", **{"steps": 12, **kwargs})
    with pytest.raises(InputError, match="'bogus' is not a device"):
        Editor.from_pretrained("whatever", device="bogus")
    with pytest.raises(InputError, match="compiling needs the models on a CUDA device; they are on cpu"):
        editor.compile()
    for kwargs, words in (({"skip": 12}, "skip must be in 0..11"), ({"source_guidance": float("nan")},
                                                                     "guidance must be a finite number")):
        with pytest.raises(InputError, match=re.escape(words)):
            editor.invert_and_edit(picture, "a red square", "a", steps=12, seed=0, **kwargs)


def test_api_refuses_bad_p2p_settings(editor, api_code):
    from efddpm.method.p2p import P2P
    for p2p, words in ((P2P(xa=2.0), "xa must be in [0, 1], got 2"),
                       (P2P(sa=float("nan")), "sa must be a finite number"),
                       (P2P(window="steps"), "window must be one of all, run, got 'steps'"),
                       (P2P(blend=("cow",)), "blend word 'cow' is not a word of the source or target prompts"),
                       (P2P(blend=("a b",)), "blend must be words (strings without spaces)"),
                       (P2P(reweight={"red": 2.0}), "reweight word 'red' is not a word of the target prompt 'a'"),
                       (P2P(reweight={"a": 1e30}), "reweight a must be in [-100, 100]"),
                       (P2P(xa=0.0, reweight={"a": 2.0}), "xa must be above 0"),
                       ({"xa": 0.5}, "p2p must be an efddpm.method.p2p.P2P, got dict")):
        with pytest.raises(InputError, match=re.escape(words)):
            editor.edit(api_code, "a", skip=4, p2p=p2p)
    two = LatentCode(*(torch.cat([t, t], dim=-4) for t in (api_code.x_T, api_code.zs, api_code.xts)),
                     api_code.timesteps, api_code.settings)
    with pytest.raises(InputError, match="Prompt-to-Prompt edits one inversion; the code holds 2"):
        editor.edit(two, ["a", "b"], skip=4, p2p=P2P())


def test_api_image_tensors_uint8_is_read_as_0_to_255_nan_and_range_are_refused(editor, picture):
    """Once a uint8 [3, H, W] tensor silently became an all-white picture."""
    x0, _ = editor.encode_image(picture)
    array = np.array(Image.open(picture).convert("RGB"))
    from_uint8, _ = editor.encode_image(torch.from_numpy(array).permute(2, 0, 1))
    assert torch.equal(from_uint8, x0)
    floats = torch.from_numpy(array).permute(2, 0, 1).float()
    for bad, words in ((floats.clone().fill_(float("nan")), "NaN or infinite"),
                       (floats.clone().fill_(float("inf")), "NaN or infinite"),
                       (floats, r"floating image tensors must lie in \[0, 1\]")):
        with pytest.raises(ImageError, match=words):
            editor.encode_image(bad)


@pytest.mark.skipif(not EMBEDDED.is_file(), reason=f"{EMBEDDED} not present")
def test_api_refuses_picture_sides_the_model_cannot_run(picture):
    shapes_editor = Editor.from_pretrained(str(EMBEDDED))
    for size in (8, 24, 40, 72):
        with pytest.raises(InputError, match=f"size must be a multiple of 16 for this model .* got {size}"):
            shapes_editor.encode_image(picture, size)
    with pytest.raises(InputError, match="size 2048 needs about"):
        shapes_editor.encode_image(picture, 2048)


def test_api_refuses_the_fast_path_off_cuda(editor):
    """fast=True means CUDA graphs: on CPU models it used to end in 'torch.cuda.Stream requires CUDA support' at the
    first UNet call."""
    with pytest.raises(InputError, match="fast=True needs the models on a CUDA device; they are on cpu"):
        Editor(editor.models, torch.float32, fast=True)
