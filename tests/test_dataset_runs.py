"""`efddpm batch` as a dataset run (efddpm.app.dataset_run): per-item seeds, a manifest that a rerun resumes from,
shards (--shard I/N and torchrun), items that fail at run time, refusals. On the small random model of conftest.py,
on the CPU; most runs call main() in-process, the killed run and torchrun are real processes."""
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from efddpm.app.cli import main
from efddpm.app.dataset_run import item_seed, shard_of
from efddpm.app.manifest import Appender, sha256

FAST = ["--steps", "12", "--skip", "4", "--quiet"]
IDS = ["p0", "p1", "p2", "p3", "p4", "p5"]      # shard 0 of 2: p1, p2; shard 1: the others (asserted below)
ENV = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}   # the bits depend on the thread count


def pictures(folder: Path, ids=IDS) -> list[dict]:
    """One picture per id, a square of its own colour and place; the batch list's entries for them."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for n, name in enumerate(ids):
        img = Image.new("RGB", (40, 40), (255, 255, 255))
        img.paste((40 * n % 256, 200 - 30 * n, 90), (4 + 3 * n, 6, 24 + 2 * n, 30))
        img.save(folder / f"{name}.png")
        entries.append({"image": f"{name}.png", "source": "a red square", "targets": ["a blue square", "a circle"]})
    return entries


def listing(folder: Path, entries: list[dict], name: str = "edits.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(entries))
    return path


def batch(capsys, path: Path, out: Path, model: Path, *extra) -> tuple[int, list[str]]:
    code = main(["batch", str(path), "--model", str(model), "--out", str(out), *FAST, *map(str, extra)])
    return code, capsys.readouterr().err.strip().splitlines()


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def outputs(folder: Path) -> list[tuple]:
    """The output lines of manifest.jsonl as (id, k, output, sha256, item_seed), in order."""
    return [(r["id"], r["k"], r["output"], r["sha256"], r["item_seed"]) for r in lines(folder / "manifest.jsonl")
            if r["kind"] == "output"]


def metadata(path: Path) -> dict:
    with Image.open(path) as img:
        return json.loads(img.text["efddpm"])


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------------ (a) seeds

def test_an_items_png_does_not_depend_on_its_position_or_the_other_items(tmp_path, capsys, model):
    entries = pictures(tmp_path)
    twins = [{**entries[0], "id": "twin-a"}, {**entries[0], "id": "twin-b"}]   # one picture, one prompt, two ids
    runs = {"all": entries + twins, "alone": [entries[3]], "reversed": entries[::-1], "twins": twins[::-1]}
    for name, run in runs.items():
        code, err = batch(capsys, listing(tmp_path, run, f"{name}.json"), tmp_path / name, model, "--seed", "5")
        assert code == 0, err
    every = pngs(tmp_path / "all")
    assert len(every) == 16
    for name in ("alone", "reversed", "twins"):
        assert pngs(tmp_path / name) == {k: every[k] for k in pngs(tmp_path / name)}, name
    twin_a, twin_b = (np.asarray(Image.open(tmp_path / "all" / f"twin-{t}_1.png"), np.float64) for t in "ab")
    assert np.abs(twin_a - twin_b).mean() > 5              # each item draws from its own seed: other noise
    meta = metadata(tmp_path / "alone" / "p3_1.png")
    assert (meta["seed"], meta["item_id"], meta["run"]["seed"]) == (documented_seed(5, "p3"), "p3", 5)
    assert meta["inversion"]["seed"] == item_seed(5, "p3") == documented_seed(5, "p3")
    assert {r[0]: r[4] for r in outputs(tmp_path / "all")} == {i: documented_seed(5, i) for i in IDS + ["twin-a",
                                                                                                          "twin-b"]}


def documented_seed(run_seed: int, item_id: str) -> int:
    """The rule of efddpm.app.dataset_run's notes, restated."""
    digest = hashlib.sha256(f"efddpm item seed:{run_seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


# ------------------------------------------------------------------------------------------------ (b) shards

def test_two_shards_make_the_unsharded_runs_outputs_and_merge_into_one_manifest(tmp_path, capsys, model,
                                                                                 monkeypatch):
    path = listing(tmp_path, pictures(tmp_path))
    assert [i for i in IDS if shard_of(i, 2) == 0] == ["p1", "p2"]
    assert batch(capsys, path, tmp_path / "whole", model, "--seed", "3")[0] == 0
    shared = tmp_path / "shards"
    for index in (0, 1):
        code, err = batch(capsys, path, shared, model, "--seed", "3", "--shard", f"{index}/2")
        assert code == 0, err
        part = lines(shared / f"manifest.shard-{index}-of-2.jsonl")
        assert {r["id"] for r in part if r["kind"] == "output"} == {i for i in IDS if shard_of(i, 2) == index}
    assert pngs(shared) == pngs(tmp_path / "whole")
    # by id, not by position: shard 0 of the list reversed runs the same items
    reversed_list = listing(tmp_path, json.loads(path.read_text())[::-1], "reversed.json")
    assert batch(capsys, reversed_list, tmp_path / "reversed", model, "--seed", "3", "--shard", "0/2")[0] == 0
    assert pngs(tmp_path / "reversed") == {k: v for k, v in pngs(shared).items() if k[:2] in ("p1", "p2")}
    # the unsharded command finds every output done (it loads no model) and merges the parts
    monkeypatch.setattr("efddpm.app.cli.commands.load_editor", lambda *a: pytest.fail("loaded a model"))
    code, err = batch(capsys, path, shared, model, "--seed", "3")
    assert code == 0, err
    assert files(shared) == sorted([*pngs(shared), "manifest.jsonl"])
    assert outputs(shared) == outputs(tmp_path / "whole")          # each output once, in the file's order
    summary = lines(shared / "manifest.jsonl")[-1]
    assert (summary["kind"], summary["items"], summary["done"], summary["failed"], summary["outputs"]) == (
        "summary", 6, 6, 0, 12)


# ------------------------------------------------------------------------------------------------ (c) killed

def near(a: dict[str, bytes], b: dict[str, bytes]) -> bool:
    """The same PNG names, pixels within 2/255 (batches of other compositions: rounding, tests/test_batched.py)."""
    def pixels(data):
        return np.asarray(Image.open(io.BytesIO(data))).astype(int)
    return sorted(a) == sorted(b) and all(np.abs(pixels(a[n]) - pixels(b[n])).max() <= 2 for n in a)


@pytest.mark.parametrize("k", [1, 4])
def test_a_killed_run_resumes_to_the_uninterrupted_runs_outputs(tmp_path, capsys, model, k):
    """K = 1: the very bytes of the uninterrupted run. K = 4: a killed batch is redone in other batches, so the same
    edits up to rounding; either way every output exactly once, and no partial file."""
    path = listing(tmp_path, pictures(tmp_path))
    assert batch(capsys, path, tmp_path / "whole", model, "--seed", "1", "--batch-size", k)[0] == 0
    out = tmp_path / "out"
    manifest = out / "manifest.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "efddpm", "batch", str(path), "--model", str(model), "--out",
                             str(out), "--seed", "1", "--batch-size", str(k), *FAST], env=ENV, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (manifest.exists() and '"kind": "output"' in manifest.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    text = [line for line in manifest.read_text().splitlines(keepends=True) if line.endswith("\n")]
    kinds = [json.loads(line)["kind"] for line in text]
    assert 0 < kinds.count("output") < 12 and kinds[-1] == "output"
    whole = pngs(tmp_path / "whole")
    assert all(whole[name] == data for name, data in pngs(out).items()) or k > 1   # no partial PNG, only finished
    assert all(sha256(out / r["output"]) == r["sha256"] for r in map(json.loads, text) if r["kind"] == "output")
    # what a kill may also leave: an output placed before its line, a torn last line, a temporary file
    manifest.write_text("".join(text[:-1]) + text[-1][: len(text[-1]) // 2])
    (out / ".p5_1.png.x1y2.tmp").write_bytes(b"half a png")
    code, err = batch(capsys, path, out, model, "--batch-size", k)   # without --seed: the recorded one
    assert code == 0, err
    assert files(out) == sorted([*whole, "manifest.jsonl"])
    assert pngs(out) == whole if k == 1 else near(pngs(out), whole)
    assert [o[:3] + o[4:] for o in outputs(out)] == [o[:3] + o[4:] for o in outputs(tmp_path / "whole")]   # no sha
    assert all(sha256(out / name) == digest for _, _, name, digest, _ in outputs(out))


def test_the_next_appender_cuts_a_torn_last_line_off(tmp_path):
    path = tmp_path / "manifest.shard-1-of-2.jsonl"
    path.write_text('{"kind": "run"}\n{"kind": "outp')          # a process killed while appending
    appender = Appender(path)
    appender.append({"kind": "summary"}, {"kind": "summary"})
    appender.close()
    assert path.read_text() == '{"kind": "run"}\n{"kind": "summary"}\n{"kind": "summary"}\n'


# ------------------------------------------------------------------------------------------------ (d) failures

@pytest.mark.parametrize("k", [1, 4])
def test_an_image_damaged_at_run_time_is_recorded_and_the_others_finish(tmp_path, capsys, model, monkeypatch, k):
    path = listing(tmp_path, pictures(tmp_path))
    good = (tmp_path / "p2.png").read_bytes()
    import efddpm.app.cli.commands as commands
    real = commands.check_images

    def check_then_damage(*args):
        real(*args)                                              # the images decode when the run begins ...
        (tmp_path / "p2.png").write_bytes(good[: len(good) // 2])   # ... and one is damaged before its turn
    monkeypatch.setattr(commands, "check_images", check_then_damage)
    out = tmp_path / "out"
    code, err = batch(capsys, path, out, model, "--seed", "2", "--batch-size", k)
    assert code == 1
    assert err[0].startswith("efddpm: entry 3 failed: image file is damaged") and err[-1].startswith(
        f"efddpm: 1 of 6 items failed; see {out / 'manifest.jsonl'}"), err
    assert sorted(pngs(out)) == sorted(f"{i}_{k}.png" for i in IDS if i != "p2" for k in (1, 2))
    failed = [r for r in lines(out / "manifest.jsonl") if r["kind"] == "failed"]
    assert [(r["id"], r["image"], r["targets"]) for r in failed] == [("p2", str(tmp_path / "p2.png"),
                                                                      ["a blue square", "a circle"])]
    assert "image file is damaged" in failed[0]["error"] and lines(out / "manifest.jsonl")[-1]["failed"] == 1
    # repaired, the same command redoes only the failed item
    monkeypatch.setattr(commands, "check_images", real)
    (tmp_path / "p2.png").write_bytes(good)
    before = pngs(out)
    code, err = batch(capsys, path, out, model, "--seed", "2", "--batch-size", k)
    assert code == 0, err
    assert {k: v for k, v in pngs(out).items() if k in before} == before and len(pngs(out)) == 12
    assert [r["kind"] for r in lines(out / "manifest.jsonl")] == ["run", *["output"] * 12, "summary"]


# ------------------------------------------------------------------------------------------------ (e) refusals

def refused(capsys, argv_tail, path, out, model, words) -> None:
    before = {p: p.read_bytes() for p in sorted(out.rglob("*"))}
    code, err = batch(capsys, path, out, model, *argv_tail)
    assert code == 2 and len(err) == 1 and err[0].startswith("efddpm: error: ") and words in err[0], err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*"))} == before


def test_a_rerun_with_other_settings_is_refused_unless_overwrite(tmp_path, capsys, model):
    path = listing(tmp_path, pictures(tmp_path, IDS[:2]))
    out = tmp_path / "out"
    assert batch(capsys, path, out, model)[0] == 0                  # no --seed: drawn, and recorded
    seed = lines(out / "manifest.jsonl")[0]["settings"]["seed"]
    for extra, words in ((["--steps", "10"], "(--steps 12, now 10)"), (["--seed", str(seed + 1)], "(--seed"),
                         (["--cfg-tgt", "3"], "(--cfg-tgt None, now 3.0)"), (["--p2p"], "(--p2p False, now True)"),
                         (["--dtype", "float64"], "(--dtype 'float32', now 'float64')")):
        refused(capsys, extra, path, out, model, f"{out / 'manifest.jsonl'} was written with other settings {words}")
    (out / "p1_2.png").unlink()                                     # without --seed a rerun takes the recorded one
    assert batch(capsys, path, out, model)[0] == 0
    assert metadata(out / "p1_2.png")["run"]["seed"] == seed and len(outputs(out)) == 4
    code, err = batch(capsys, path, out, model, "--steps", "10", "--overwrite", "--seed", "9")
    assert code == 0, err
    assert {r[0] for r in outputs(out)} == {"p0", "p1"} and metadata(out / "p0_1.png")["steps"] == 10
    assert {line["settings"]["steps"] for line in lines(out / "manifest.jsonl")} == {10}


def test_a_run_of_an_earlier_version_resumes(tmp_path, capsys, model):
    """Its manifest lacks the settings added since (method, batch_size, compile): read as what that run did, it
    resumes, its outputs kept, and the merged manifest records them."""
    path = listing(tmp_path, pictures(tmp_path, IDS[:2]))
    out = tmp_path / "out"
    assert batch(capsys, path, out, model, "--seed", "3")[0] == 0
    old = [{**line, "settings": {k: v for k, v in line["settings"].items()
                                 if k not in ("method", "batch_size", "compile")}}
           for line in lines(out / "manifest.jsonl")]
    (out / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in old))
    before = pngs(out)
    (out / "p1_2.png").unlink()
    assert batch(capsys, path, out, model, "--seed", "3", "--batch-size", "1")[0] == 0
    assert pngs(out) == before                                      # kept, and the missing one made again alike
    assert {line["settings"]["method"] for line in lines(out / "manifest.jsonl")} == {"edit-friendly"}


def test_files_in_the_way_are_refused_and_changed_entries_redone(tmp_path, capsys, model):
    path = listing(tmp_path, pictures(tmp_path, IDS[:2]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "p0_1.png").write_bytes(b"someone else's")               # no manifest lists it
    refused(capsys, ["--seed", "1"], path, out, model, f"output exists: {out / 'p0_1.png'}; neither the manifests")
    (out / "p0_1.png").unlink()
    assert batch(capsys, path, out, model, "--seed", "1")[0] == 0
    (out / "p1_1.png").write_bytes(b"changed")                      # listed, but not with these bytes
    refused(capsys, [], path, out, model, f"output exists: {out / 'p1_1.png'}; neither the manifests")
    (out / "p1_1.png").unlink()
    before = pngs(out)
    entries = json.loads(path.read_text())
    entries[0]["source"] = "a square"                               # p0's entry changed since its outputs were made
    code, err = batch(capsys, listing(tmp_path, entries), out, model)
    assert code == 0, err
    after = pngs(out)
    assert after["p0_1.png"] != before["p0_1.png"] and metadata(out / "p0_1.png")["source"] == "a square"
    assert after["p1_2.png"] == before["p1_2.png"] and len(after) == 4
    assert [r[2] for r in outputs(out)] == ["p0_1.png", "p0_2.png", "p1_1.png", "p1_2.png"]


# ------------------------------------------------------------------------------------------------ (f) torchrun

@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_with_two_cpu_processes_equals_the_unsharded_run(tmp_path, capsys, model):
    path = listing(tmp_path, pictures(tmp_path))
    assert batch(capsys, path, tmp_path / "whole", model, "--seed", "4")[0] == 0
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "--monitor-interval", "0.1", "-m", "efddpm", "batch", str(path), "--model", str(model), "--out", str(out), "--seed", "4",
                        "--device", "cpu", *FAST], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert files(out) == sorted([*pngs(tmp_path / "whole"), "manifest.jsonl"])   # the parts are merged away
    assert pngs(out) == pngs(tmp_path / "whole")
    assert outputs(out) == outputs(tmp_path / "whole")


# ------------------------------------------------------------------------------------------------ (g) --shard

@pytest.mark.parametrize("value", ["2/2", "-1/2", "1/0", "0/0", "a/b", "1", "1/2/3", ""])
def test_bad_shards_are_refused(tmp_path, capsys, model, value):
    path = listing(tmp_path, pictures(tmp_path, IDS[:1]))
    before = files(tmp_path)
    code, err = batch(capsys, path, tmp_path / "out", model, "--seed", "1", f"--shard={value}")
    assert code == 2 and err == [f"efddpm: error: --shard must be I/N with 0 <= I < N (e.g. 0/4), got {value!r}"]
    assert files(tmp_path) == before


@pytest.mark.parametrize("case", ["no seed", "under torchrun", "torchrun and cuda:1", "torchrun rank past size"])
def test_shards_that_cannot_work_are_refused(tmp_path, capsys, model, monkeypatch, case):
    path = listing(tmp_path, pictures(tmp_path, IDS[:1]))
    argv, words = {"no seed": (["--shard", "0/2"], "--shard 0/2 needs --seed"),
                   "under torchrun": (["--shard", "0/2", "--seed", "1"], "--shard cannot be used under torchrun"),
                   "torchrun and cuda:1": (["--device", "cuda:1"], "under torchrun pass --device cuda"),
                   "torchrun rank past size": ([], "RANK 2 and WORLD_SIZE 2: need 0 <= RANK < WORLD_SIZE")}[case]
    if case != "no seed":
        for key, value in {"RANK": "2" if "past" in case else "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
            monkeypatch.setenv(key, value)
    before = files(tmp_path)
    code, err = batch(capsys, path, tmp_path / "out", model, *argv)
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert files(tmp_path) == before
