"""`efddpm eval` end to end on the CPU: the embedded model, three pictures, two methods, two settings -> the runs,
the table and the plot; every number of the table recomputed here from the saved pictures with efddpm.eval's
metric functions (each tested against its reference in tests/test_eval_metrics.py, test_eval_lpips.py), the 95%
intervals from the Student t quantile; a rerun reuses every score; bad inputs end in one line, exit 2."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

import efddpm.eval as ev
from efddpm.__main__ import main
from efddpm.eval.lpips import Backbone, Heads
from pathlib import Path

from efddpm.app.datasets import DatasetItem, PieAnnotation
from efddpm.eval.runs import Edit, as_uint8
from efddpm.eval.stats import summarise, t_quantile
from efddpm.miniature import tradeoff
from efddpm.miniature.measure import measure_edit
from efddpm.miniature import world

pytest.importorskip("transformers")
STEPS = ["--steps", "10", "--seed", "5", "--quiet"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three held-out pictures of the embedded world with their edits' masks, as a batch list."""
    folder = tmp_path_factory.mktemp("mini")
    listed = tradeoff.write_dataset(folder, 2)
    entries = json.loads(listed.read_text())[:3]
    listed.write_text(json.dumps(entries))
    return listed


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random SqueezeNet-LPIPS weights in the layouts of torchvision's checkpoint and of LPIPS' heads."""
    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    torch.save(Backbone("squeeze").state_dict(), folder / "backbone.pth")
    heads = Heads("squeeze")
    for p in heads.parameters():
        p.data.uniform_(0, 0.2)                                 # LPIPS' heads are non-negative
    torch.save(heads.state_dict(), folder / "heads.pth")
    return folder


def flags(clip_folder, lpips_files):
    return ["--metrics", "bg_psnr,bg_mse,bg_ssim,bg_lpips,psnr,clip,clip_edited,lpips", "--clip", str(clip_folder),
            "--lpips-net", "squeeze", "--lpips-backbone", str(lpips_files / "backbone.pth"),
            "--lpips-heads", str(lpips_files / "heads.pth"), "--device", "cpu"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, dataset, clip_folder, lpips_files):
    out = tmp_path_factory.mktemp("sweep") / "out"
    assert main(["eval", "--dataset", str(dataset), "--methods", "edit-friendly,edit-friendly+p2p",
                 "--sweep", "skip=3,6", "--out", str(out), *flags(clip_folder, lpips_files), *STEPS]) == 0
    return out


def recomputed(run, dataset, clip_folder, lpips_files) -> list[dict]:
    """Each edit of a run measured here, from its PNG, its input and its mask."""
    scorer = ev.CLIPScorer.load(str(clip_folder))
    lpips = ev.LPIPS.load("squeeze", backbone=lpips_files / "backbone.pth", heads=lpips_files / "heads.pth")
    lines = [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()]
    out = []
    for line in (x for x in lines if x["kind"] == "output"):
        edit = ev.rgb_pixels(run / line["output"])                                    # uint8 [3, 64, 64]
        source = ev.rgb_pixels(dataset.parent / "inputs" / f"{line['id']}.png")
        edited = (ev.rgb_pixels(dataset.parent / "masks" / f"{line['id']}.png").float().mean(0) >= 127.5).float()
        background = ev.background_scores(source, edit, 1 - edited)
        whole = ev.background_scores(source, edit, torch.ones(64, 64))
        out.append({"bg_psnr": background["psnr"], "bg_mse": background["mse"], "bg_ssim": background["ssim"],
                    "bg_lpips": lpips.on_region(source, edit, 1 - edited), **whole,
                    "clip": float(scorer([edit], [line["target"]])[0]),
                    "clip_edited": float(scorer.on_region([edit], [line["target"]], [edited])[0]),
                    "lpips": lpips(source, edit)})
    return out


def test_the_table_recomputes_from_the_saved_pictures(swept, dataset, clip_folder, lpips_files):
    table = json.loads((swept / "table.json").read_text())
    rows = {row["run"].rsplit("/", 1)[-1]: row for row in table["rows"]}
    assert sorted(rows) == ["edit-friendly+p2p_skip3", "edit-friendly+p2p_skip6", "edit-friendly_skip3",
                            "edit-friendly_skip6"]
    assert rows["edit-friendly+p2p_skip6"]["method"] == "edit-friendly+p2p"
    assert rows["edit-friendly_skip3"]["setting"].startswith("skip 3 ")
    for name, row in rows.items():
        scores = recomputed(swept / "runs" / name, dataset, clip_folder, lpips_files)
        assert row["edits"] == len(scores) == 3
        for metric in table["metrics"]:
            values = [s[metric] for s in scores]
            scale = table["scale"][metric]
            x = np.array(values)
            assert row[metric]["mean"] == pytest.approx(x.mean() * scale, rel=1e-9, abs=1e-12), (name, metric)
            half = 4.302652729911275 * x.std(ddof=1) / math.sqrt(3) * scale    # t_{0.975, 2}
            assert row[metric]["ci95"] == pytest.approx(half, rel=1e-6, abs=1e-12), (name, metric)
    ssim = [rows[n]["bg_ssim"]["mean"] for n in sorted(rows)]
    assert len(set(ssim)) == 4                        # the four runs are four different sets of edits
    csv = (swept / "table.csv").read_text().splitlines()
    assert len(csv) == 1 + 4 and csv[0].startswith("run,method,setting,edit_type,edits,not_scored,bg_psnr_mean")
    assert (swept / "tradeoff.png").stat().st_size > 1000 and "| edit-friendly+p2p |" in (swept / "table.md").read_text()


def test_a_rerun_reuses_every_score_and_a_new_metric_adds_only_its_own(swept, dataset, clip_folder, lpips_files,
                                                                       tmp_path):
    out = tmp_path / "again"
    shutil.copytree(swept, out, ignore=shutil.ignore_patterns("runs"))
    runs = sorted(str(p) for p in (swept / "runs").iterdir()) + ["--dataset", str(dataset)]
    before = (out / "scores.jsonl").read_text()
    assert main(["eval", *runs, "--out", str(out), *flags(clip_folder, lpips_files), "--quiet"]) == 0
    assert (out / "scores.jsonl").read_text() == before
    rows = lambda folder: sorted(json.loads((folder / "table.json").read_text())["rows"], key=lambda r: r["run"])
    assert rows(out) == rows(swept)
    with open(out / "scores.jsonl", "a") as f:
        f.write('{"kind": "scores", "torn')                                       # a killed writer's last line
    assert main(["eval", *runs, "--out", str(out), *flags(clip_folder, lpips_files)[:1], "bg_psnr,ssim",
                 "--plot", "ssim", "bg_psnr", "--quiet"]) == 0
    added = (out / "scores.jsonl").read_text()[len(before):].splitlines()
    assert len(added) == 12 and all(set(json.loads(x)["scores"]) == {"ssim"} for x in added)


def test_a_pair_of_folders_is_measured_file_by_file(swept, dataset, clip_folder, lpips_files, tmp_path):
    """--pair INPUTS EDITS: each edit against the input of its name, its prompt from --prompts (one left out: its
    CLIP score is not defined and is counted apart)."""
    run = swept / "runs" / "edit-friendly_skip3"
    inputs, edits = tmp_path / "inputs", tmp_path / "edits"
    inputs.mkdir(), edits.mkdir()
    lines = [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()]
    outputs = [x for x in lines if x["kind"] == "output"]
    for line in outputs:
        shutil.copy(run / line["output"], edits / f"{line['id']}.png")
        shutil.copy(dataset.parent / "inputs" / f"{line['id']}.png", inputs / f"{line['id']}.png")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({f"{x['id']}.png": x["target"] for x in outputs[1:]}))
    out = tmp_path / "out"
    assert main(["eval", "--pair", str(inputs), str(edits), "--prompts", str(prompts), "--out", str(out),
                 *flags(clip_folder, lpips_files)[:1], "psnr,ssim,clip,lpips", *flags(clip_folder, lpips_files)[2:],
                 "--quiet"]) == 0
    row = json.loads((out / "table.json").read_text())["rows"][0]
    by_run = {r["run"].rsplit("/", 1)[-1]: r for r in json.loads((swept / "table.json").read_text())["rows"]}
    assert row["method"] == "pair" and row["edits"] == 3
    for metric in ("psnr", "lpips"):                  # the same pictures as the run: the same numbers
        assert row[metric]["mean"] == pytest.approx(by_run["edit-friendly_skip3"][metric]["mean"], rel=1e-12)
    assert (row["clip"]["n"], row["clip"]["not_finite"]) == (2, 1)


@pytest.mark.parametrize("argv, message", [(["--pictures", "0"], "--pictures must be at least 1"),
                                           (["--metrics", "world_hit,gloss"], "unknown metric 'gloss'"),
                                           (["--sweep", "skip=x"], "is not skip=value"),
                                           (["--plot", "psnr", "world_hit"], "--plot: psnr is not among")])
def test_the_miniatures_bad_inputs_write_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "mini"
    assert tradeoff.main(["--out", str(out), *argv]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and not out.exists()


def test_a_pie_bench_region_is_decoded_at_512_and_resized_to_the_edit():
    """PIE-Bench's run-length encoding counts pixels of its 512 x 512 pictures: a box of rows 128..255, columns
    64..319 is the same box at any edit size (here 64: rows 16..31, columns 8..39), border rule included."""
    rle = [v for y in range(128, 256) for v in (y * 512 + 64, 256)]
    item = DatasetItem("a", Path("a.png"), "s", ["t"], pie=PieAnnotation("1", "", (), (), (), tuple(rle)))
    edit = Edit("a_1", Path("a_1.png"), "", Path("a.png"), "t", item)
    expected = torch.zeros(64, 64)
    expected[16:32, 8:40] = 1
    expected[[0, -1], :], expected[:, [0, -1]] = 1, 1
    assert torch.equal(edit.region(64), expected)
    assert torch.equal(edit.region(512), ev.edited_region(rle))


def test_t_quantiles_and_intervals():
    for nu, t in ((1, 12.706204736), (2, 4.302652730), (10, 2.228138852), (30, 2.042272456)):
        assert t_quantile(0.975, nu) == pytest.approx(t, abs=1e-6)
    s = summarise([1.0, 2.0, float("inf"), 4.0, float("nan")])
    assert (s.n, s.not_finite, s.mean) == (3, 2, pytest.approx(7 / 3))
    assert math.isnan(summarise([1.0]).ci95) and math.isnan(summarise([]).mean)


def test_the_miniature_measures_by_the_worlds_pixel_rules(tmp_path):
    out = tmp_path / "mini"
    assert tradeoff.main(["--out", str(out), "--pictures", "1", "--methods", "edit-friendly", "--sweep", "skip=4",
                          *STEPS]) == 0
    table = json.loads((out / "table.json").read_text())
    assert table["metrics"][:2] == ["world_hit", "world_mask_iou"]
    specs = json.loads((out / "data" / "world.json").read_text())
    run = out / "runs" / "edit-friendly_skip4"
    hits = []
    for line in (json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()):
        if line["kind"] == "output":
            spec = specs[line["id"]]
            source = as_uint8(out / "data" / "inputs" / f"{line['id']}.png", 64).permute(1, 2, 0).numpy()
            edit = ev.rgb_pixels(run / line["output"]).permute(1, 2, 0).numpy()
            hits.append(measure_edit(world.Picture(**spec["source"]), world.Picture(**spec["target"]), spec["kind"],
                                     source, edit)["hit"])
    assert table["rows"][0]["world_hit"]["mean"] == pytest.approx(np.mean(hits)) and len(hits) == 2


@pytest.mark.parametrize("argv, message", [
    ([], "give result folders"),
    (["--pair", "nowhere", "nowhere", "--metrics", "psnr", "--plot", "psnr", "psnr"], "--pair: folder not found"),
    (["{run}", "--metrics", "psnr,sharpness"], "unknown metric 'sharpness'"),
    (["{run}", "--metrics", "psnr"], "--plot: lpips is not among the metrics"),
    (["{empty}", "--metrics", "psnr", "--plot", "psnr", "psnr"], "has no manifest.jsonl"),
    (["{run}", "{run}", "--metrics", "psnr", "--plot", "psnr", "psnr"], "is given twice"),
    (["{run}", "--metrics", "psnr", "--plot", "psnr", "psnr", "--device", "tpu:7"], "--device 'tpu:7' is not a device"),
    (["{run}", "--metrics", "bg_psnr,psnr", "--plot", "psnr", "psnr"], "bg_psnr needs the edited region"),
    (["--sweep", "skip=3", "--metrics", "psnr"], "--sweep needs --methods"),
    (["--methods", "edit-friendly", "--metrics", "psnr"], "--methods needs --dataset"),
    (["--dataset", "{dataset}", "--methods", "magic", "--metrics", "psnr"], "unknown method 'magic'"),
    (["--dataset", "{dataset}", "--methods", "ddim", "--sweep", "skip=a", "--metrics", "psnr"], "is not skip=value"),
    (["--dataset", "{dataset}", "--methods", "ddim", "--sweep", "steps=3", "--metrics", "psnr"], "cannot sweep"),
    (["{run}", "--metrics", "structure_distance", "--dino", "{empty}/none.pth", "--plot", "structure_distance",
      "structure_distance"], "DINO weights not found"),
])
def test_bad_inputs_end_in_one_line(argv, message, swept, dataset, tmp_path, capsys):
    run = sorted((swept / "runs").iterdir())[0]
    argv = [a.format(run=run, empty=tmp_path, dataset=dataset) for a in argv]
    out = tmp_path / "out"
    assert main(["eval", *argv, "--out", str(out), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and not out.exists()
