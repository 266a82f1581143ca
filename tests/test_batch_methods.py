"""`efddpm batch --method`: the paper's comparison methods (native DDPM inversion, DDIM inversion, SDEdit) through
the batched engine (efddpm.app.batched). One job is the efddpm.method functions on the job alone, bit for bit; a
batch is each job's own edit up to rounding; the method is a run setting; flags a method does not read are refused.
On the small random model of conftest.py (32x32 pictures, float32, CPU), few steps: the plumbing, not the method."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from efddpm.app.batched import Job, Settings, edit_batch
from efddpm.app.cli import main
from efddpm.app.dataset_run import item_seed
from efddpm.app.editor import Editor
from efddpm.app.images import load_image, to_pil
from efddpm.core.checks import InputError
from efddpm.method.inversion import ddim_inversion, native_inversion, regenerate
from efddpm.method.manipulations import sdedit
from efddpm.method.p2p import P2P

from test_batched import PIXEL_TOLERANCE, SKIP, STEPS, jobs, pixels, squares

FAST = ["--steps", str(STEPS), "--skip", str(SKIP), "--quiet"]
CODE_METHOD = {"edit-friendly": "edit_friendly", "native": "native", "ddim": "ddim", "sdedit": "sdedit"}


@pytest.fixture(scope="module")
def editor(model):
    return Editor.from_pretrained(str(model))


def direct(editor, job: Job, method: str, guidance: float = 3.5) -> list[np.ndarray]:
    """The job's pictures by the efddpm.method functions alone, on the latents, prompts and generator the engine
    uses: the native inversion or DDIM's and the regeneration, or SDEdit of the picture repeated once per target."""
    x0 = editor.encode_pictures(load_image(job.image, editor.check_size(None))[0])       # [1, 4, h, w]
    f, uncond, targets = editor.noise_predictor(), editor.encode_prompts(""), editor.encode_prompts(job.targets)
    cond = editor.encode_prompts(job.source) if job.source else None
    guidance = guidance if job.source else None
    generator = torch.Generator().manual_seed(job.seed)
    with torch.inference_mode():
        if method == "sdedit":
            latents = sdedit(f, x0.expand(len(job.targets), -1, -1, -1), STEPS - SKIP, targets, uncond, job.guidances,
                             num_steps=STEPS, eta=1.0, generator=generator)
        else:
            code = native_inversion(f, x0, cond, uncond, guidance, num_steps=STEPS, eta=1.0, generator=generator,
                                    skip=SKIP) if method == "native" else \
                ddim_inversion(f, x0, cond, uncond, guidance, num_steps=STEPS)
            latents = regenerate(f, code, targets, uncond, job.guidances, skip=SKIP)
    return [np.asarray(img) for img in to_pil(editor.decode(latents))]


@pytest.mark.parametrize("method", ["native", "ddim", "sdedit"])
def test_one_job_is_the_method_alone_and_a_batch_each_jobs_own_edit(editor, method):
    many = jobs(3)                                      # job 1 has two targets: SDEdit draws for both
    settings = Settings(STEPS, 3.5, 1.0, SKIP, method=method)
    alone, = edit_batch(editor, [many[1]], settings)
    together = edit_batch(editor, many, settings)
    worst = 0
    for i, (job, result) in enumerate(zip(many, together, strict=True)):
        expected = direct(editor, job, method)
        if i == 1:
            assert all(np.array_equal(a, b) for a, b in zip(pixels(alone), expected, strict=True))
        worst = max(worst, *(np.abs(a.astype(int) - b).max() for a, b in zip(pixels(result), expected, strict=True)))
        assert result.inversion["method"] == CODE_METHOD[method]
        assert result.inversion["seed"] == (None if method == "ddim" else job.seed)   # DDIM draws nothing
    assert worst <= PIXEL_TOLERANCE
    assert np.abs(pixels(together[0])[0].astype(int) - pixels(together[2])[0]).max() > 20   # each job its own


def test_sdedit_refuses_prompt_to_prompt_and_the_engine_unknown_methods(editor):
    with pytest.raises(InputError, match="sdedit inverts nothing"):
        edit_batch(editor, jobs(1, P2P()), Settings(STEPS, 3.5, 1.0, SKIP, method="sdedit"))
    with pytest.raises(InputError, match="method must be one of edit-friendly, native, ddim, sdedit, got 'ddpm'"):
        edit_batch(editor, jobs(1), Settings(STEPS, 3.5, 1.0, SKIP, method="ddpm"))


# ------------------------------------------------------------------------------------------------ efddpm batch

def listing(folder: Path, n: int = 2, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, img in enumerate(squares(n)):
        img.save(folder / f"s{i}.png")
        entries.append({"image": f"s{i}.png", "source": "a red square", "targets": ["a blue square", "a circle"],
                        **extra})
    path = folder / "edits.json"
    path.write_text(json.dumps(entries))
    return path


def batch(capsys, path: Path, out: Path, model: Path, *extra) -> tuple[int, list[str]]:
    code = main(["batch", str(path), "--model", str(model), "--out", str(out), "--seed", "3", *FAST, *extra])
    return code, capsys.readouterr().err.strip().splitlines()


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def metadata(path: Path) -> dict:
    with Image.open(path) as img:
        return json.loads(img.text["efddpm"])


def test_each_method_is_a_run_setting_and_makes_its_own_pictures(tmp_path, capsys, model, editor):
    path = listing(tmp_path)
    for method in ("native", "ddim", "sdedit"):
        out = tmp_path / method
        code, err = batch(capsys, path, out, model, "--method", method)
        assert code == 0, err
        assert {line["settings"]["method"] for line in lines(out)} == {method}
        meta = metadata(out / "s0_2.png")
        assert meta["run"]["method"] == method and meta["inversion"]["method"] == CODE_METHOD[method]
        assert (meta["cfg_src"], meta["eta"]) == {"native": (3.5, 1.0), "ddim": (3.5, None), "sdedit": (None, 1.0)}[
            method]                                     # None: what the method does not read
        job = Job(tmp_path / "s0.png", "a red square", ["a blue square", "a circle"], [meta["cfg_tgt"]] * 2,
                  item_seed(3, "s0"))                   # the item's seed, derived from the run seed 3
        assert all(np.array_equal(np.asarray(Image.open(out / f"s0_{k}.png")), picture)
                   for k, picture in enumerate(direct(editor, job, method), 1))
    # resuming a folder with another method is refused, before any work
    before = {p: p.read_bytes() for p in sorted((tmp_path / "native").iterdir())}
    code, err = batch(capsys, path, tmp_path / "native", model, "--method", "ddim")
    assert code == 2 and len(err) == 1 and "written with other settings (--method 'native', now 'ddim')" in err[0]
    assert {p: p.read_bytes() for p in sorted((tmp_path / "native").iterdir())} == before
    code, err = batch(capsys, path, tmp_path / "native", model)          # the default is another method too
    assert code == 2 and "(--method 'native', now 'edit-friendly')" in err[0]


def test_ddim_with_p2p_takes_the_authors_fractions_and_differs_from_plain_ddim(tmp_path, capsys, model):
    path = listing(tmp_path, 1)
    runs = {}
    for name, extra in {"plain": [], "p2p": ["--p2p"], "xa": ["--p2p", "--xa", "0.5"]}.items():
        code, err = batch(capsys, path, tmp_path / name, model, "--method", "ddim", *extra)
        assert code == 0, err
        runs[name] = metadata(tmp_path / name / "s0_1.png"), np.asarray(Image.open(tmp_path / name / "s0_1.png"))
    assert (runs["p2p"][0]["p2p"]["xa"], runs["p2p"][0]["p2p"]["sa"]) == (0.8, 0.4)     # the authors' p2pddim
    assert (runs["xa"][0]["p2p"]["xa"], runs["xa"][0]["p2p"]["sa"]) == (0.5, 0.4)       # a flag over the default
    assert "p2p" not in runs["plain"][0]
    assert np.abs(runs["p2p"][1].astype(int) - runs["plain"][1]).max() > 5


@pytest.mark.parametrize("case", ["sdedit with --p2p", "sdedit with an entry's p2p", "sdedit with --cfg-src",
                                  "ddim with --eta", "unknown method"])
def test_flags_a_method_does_not_read_are_refused(tmp_path, capsys, model, case):
    argv, words = {
        "sdedit with --p2p": (["--method", "sdedit", "--p2p"], "--p2p replays an inversion's source row, and "
                                                              "--method sdedit inverts nothing"),
        "sdedit with an entry's p2p": (["--method", "sdedit"], "entry 1: p2p replays an inversion's source row"),
        "sdedit with --cfg-src": (["--method", "sdedit", "--cfg-src", "3.5"], "--cfg-src is the source guidance of "
                                                                             "an inversion"),
        "ddim with --eta": (["--method", "ddim", "--eta", "0.5"], "--eta: --method ddim is deterministic"),
        "unknown method": (["--method", "ddpm"], "batch: argument --method: invalid choice: 'ddpm'"),
    }[case]
    path = listing(tmp_path / "in", 1, **({"p2p": True} if "entry" in case else {}))
    before = sorted(tmp_path.rglob("*"))
    code, err = batch(capsys, path, tmp_path / "out", model, *argv)
    assert code == 2 and len(err) == 1 and err[0].startswith("efddpm: error: ") and words in err[0], err
    assert sorted(tmp_path.rglob("*")) == before
