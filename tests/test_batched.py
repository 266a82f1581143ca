"""The batched engine (efddpm.app.batched): K = 1 is the sequential edit bit for bit; K > 1 the same edits up to
rounding; a job that fails fails alone; Prompt-to-Prompt jobs keep their own controllers. On the small random model
of conftest.py (32x32 pictures, float32, CPU) and on the embedded shapes model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from efddpm.app.batched import Job, Settings, batches, edit_batch, kind
from efddpm.app.cli import main
from efddpm.app.editor import Editor
from efddpm.core.checks import InputError
from efddpm.method.p2p import P2P

STEPS, SKIP = 12, 4
SETTINGS = Settings(STEPS, 3.5, 1.0, SKIP)
# K > 1 against K = 1, float32 on the CPU: the UNet, VAE and CLIP sum in another order at another batch size, which
# moves the 8-bit pixels by rounding only (measured on these jobs: at most 1 level); a row paired with another job's
# noise maps or prompt moves them by tens of levels.
PIXEL_TOLERANCE = 2


@pytest.fixture(scope="module")
def editor(model):
    return Editor.from_pretrained(str(model))


def squares(n: int) -> list[Image.Image]:
    """n pictures, a square of its own colour and place each."""
    out = []
    for i in range(n):
        img = Image.new("RGB", (32, 32), (255, 255, 255))
        img.paste((40 * i % 256, 200 - 30 * i, 90), (3 + 2 * i, 5, 20 + i, 27))
        out.append(img)
    return out


def jobs(n: int = 3, p2p: P2P | None = None) -> list[Job]:
    targets = [["a blue square"], ["a blue square", "a big red circle"], ["a green square on black"]]
    return [Job(img, "a red square", targets[i % 3], [3.5, 7.5][:len(targets[i % 3])], 100 + i, p2p)
            for i, img in enumerate(squares(n))]


def sequential(editor, job: Job) -> tuple[list[np.ndarray], dict]:
    """What Editor.invert + Editor.edit give the job: its pictures and its inversion's settings."""
    code = editor.invert(job.image, job.source, steps=STEPS, guidance=SETTINGS.source_guidance, seed=job.seed,
                         skip=SKIP)
    images = editor.edit(code, job.targets, guidance=job.guidances, skip=SKIP, p2p=job.p2p)
    return [np.asarray(img) for img in images], code.settings


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(img) for img in result.images]


@pytest.mark.parametrize("p2p", [None, P2P(xa=0.6, sa=0.4), P2P(xa=0.8, sa=0.2, blend=("square",))])
def test_one_job_per_batch_is_the_sequential_edit_bit_for_bit(editor, p2p):
    for job in jobs(3, p2p):
        (result,) = edit_batch(editor, [job], SETTINGS)
        images, settings = sequential(editor, job)
        assert all(np.array_equal(a, b) for a, b in zip(pixels(result), images, strict=True))
        assert json.dumps(result.inversion) == json.dumps(settings)     # the same record, key for key


@pytest.mark.parametrize("p2p", [None, P2P(xa=0.6, sa=0.4, blend=("square",))])
def test_a_batch_makes_each_jobs_own_edit(editor, p2p):
    many = jobs(5, p2p)
    results = edit_batch(editor, many, SETTINGS)
    worst = 0
    for job, result in zip(many, results, strict=True):
        images, settings = sequential(editor, job)
        assert len(result.images) == len(job.targets) and result.inversion["seed"] == job.seed
        worst = max(worst, *(np.abs(a.astype(int) - b).max() for a, b in zip(pixels(result), images)))
    assert worst <= PIXEL_TOLERANCE
    # not the same picture five times: the jobs differ by more than the tolerance
    assert np.abs(pixels(results[0])[0].astype(int) - pixels(results[2])[0]).max() > 20


def test_a_damaged_image_or_bad_guidance_fails_its_job_alone(editor, tmp_path):
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    many = jobs(4)
    many[1].image = damaged
    many[2].guidances = [1e6]
    results = edit_batch(editor, many, SETTINGS)
    assert isinstance(results[1], InputError) and "damaged.png" in str(results[1])
    assert isinstance(results[2], InputError) and "guidance" in str(results[2])
    for i in (0, 3):
        alone, = edit_batch(editor, [many[i]], SETTINGS)
        assert max(np.abs(a.astype(int) - b).max() for a, b in zip(pixels(results[i]), pixels(alone))) \
            <= PIXEL_TOLERANCE


def test_a_diverging_row_fails_its_job_alone(editor, monkeypatch):
    """The UNet's output turned infinite on the row of job 2's target (rows [job 0, job 1 x2, job 2] in each
    guidance half of the regeneration's batch of 8): job 2 fails, the others are made."""
    predictor = editor.noise_predictor

    def poisoned(*args, **kwargs):
        f = predictor(*args, **kwargs)

        def g(x, t, context):
            eps = f(x, t, context)
            if x.shape[0] == 8:
                eps[[3, 7]] = float("inf")
            return eps
        return g
    monkeypatch.setattr(editor, "noise_predictor", poisoned)
    results = edit_batch(editor, jobs(3), SETTINGS)
    assert [isinstance(r, InputError) for r in results] == [False, False, True]
    assert "NaN or infinite" in str(results[2])


def test_jobs_of_different_kinds_are_refused_together(editor):
    a, b = jobs(2)
    b.source = ""
    with pytest.raises(InputError, match="one kind"):
        edit_batch(editor, [a, b], SETTINGS)


def test_batches_group_by_kind_in_order():
    items = [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5), ("a", 6), ("c", 7)]
    got = [[n for _, n in batch] for batch in batches(items, 2, key=lambda item: item[0])]
    assert got == [[1, 3], [2, 5], [4, 6], [7]]
    assert [len(b) for b in batches(range(7), 3, key=lambda _: 0)] == [3, 3, 1]
    job = jobs(1)[0]
    assert kind(job) == (True, False)


def test_cli_batch_sizes_agree_and_are_recorded(tmp_path, model, capsys):
    folder = tmp_path / "pics"
    folder.mkdir()
    entries = []
    for i, img in enumerate(squares(5)):
        img.save(folder / f"s{i}.png")
        entries.append({"image": f"s{i}.png", "source": "a red square", "targets": ["a blue square", "a circle"]})
    entries[3]["source"] = ""                           # another kind: a batch of its own
    listing = folder / "edits.json"
    listing.write_text(json.dumps(entries))
    runs = {}
    for k in (1, 3):
        out = tmp_path / f"k{k}"
        assert main(["batch", str(listing), "--model", str(model), "--out", str(out), "--steps", str(STEPS),
                     "--skip", str(SKIP), "--seed", "7", "--batch-size", str(k), "--quiet"]) == 0
        lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        outputs = [line for line in lines if line["kind"] == "output"]
        assert len(outputs) == 10 and all(line["settings"]["batch_size"] == k for line in outputs)
        runs[k] = {line["output"]: (line["batch"], np.asarray(Image.open(out / line["output"])).astype(int))
                   for line in outputs}
    assert {runs[1][name][0] for name in runs[1]} == {1}
    assert [runs[3][f"s{i}_1.png"][0] for i in range(5)] == [3, 3, 3, 1, 1]   # [s0 s1 s2], [s3] (no source), [s4]
    assert max(np.abs(runs[1][name][1] - runs[3][name][1]).max() for name in runs[1]) <= PIXEL_TOLERANCE
    # resuming with another batch size is another run's settings
    code = main(["batch", str(listing), "--model", str(model), "--out", str(tmp_path / "k3"), "--steps", str(STEPS),
                 "--skip", str(SKIP), "--batch-size", "1", "--quiet"])
    assert code == 2 and "--batch-size 3, now 1" in capsys.readouterr().err


def test_the_embedded_model_batched_within_a_level(capsys):
    """The shipped model, 100 steps: three held-out pictures' colour edits in one batch against one by one."""
    from efddpm.app.embedded import DEFAULT_MODEL
    from efddpm.miniature import world
    shapes = Editor.from_pretrained(str(DEFAULT_MODEL))
    many = []
    for i, p in enumerate(world.heldout_pictures(3, seed=3)):
        colour = world.edit_targets(p)[0]
        many.append(Job(Image.fromarray(world.render(p)), p.caption, [colour.caption], [shapes.target_guidance], i))
    settings = Settings(100, 3.5, 1.0, 36)
    together = edit_batch(shapes, many, settings)
    worst = max(np.abs(a.astype(int) - b).max() for job, result in zip(many, together)
                for a, b in zip(pixels(result), pixels(edit_batch(shapes, [job], settings)[0])))
    assert worst <= PIXEL_TOLERANCE
