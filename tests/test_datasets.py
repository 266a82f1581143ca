"""Edit lists (efddpm.app.datasets): efddpm's batch lists, the authors' dataset YAML and PIE-Bench's mapping file,
read into DatasetItems with stable ids; PIE-Bench's masks against a restatement of the reference's decoding; and
bad files through `efddpm batch`: exit code 2, one line naming the file and the entry, nothing written."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from efddpm.app.cli import main
from efddpm.app.datasets import DatasetItem, PieAnnotation, decode_pie_mask, read_dataset
from efddpm.core.checks import InputError

FAST = ["--steps", "12", "--skip", "4", "--seed", "0", "--quiet"]


def png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)
    return path


def authors_yaml(folder: Path, images=("example_images/horse_mud.png", "example_images/cat.png")) -> Path:
    """As the authors write test.yaml: a list, init_img with a leading '/', source_prompt optional."""
    for name in images:
        png(folder / name)
    path = folder / "test.yaml"
    path.write_text(f"  -\n    init_img: /{images[0]}\n    source_prompt: a photo of a horse in the mud\n\n"
                    f"    target_prompts:\n    - a photo of a horse in the snow \n    - a photo of a zebra in the mud\n"
                    f"  -\n    init_img: {images[1]}\n    target_prompts: [a photo of a dog]\n")
    return path


PIE_ENTRIES = {
    "000000000000": {"image_path": "0_random_140/000000000000.png",
                     "original_prompt": "a slanted mountain bicycle on the road",
                     "editing_prompt": "a slanted [rusty] mountain bicycle on the road",
                     "editing_instruction": "Make the frame of the bike rusty", "editing_type_id": "0",
                     "blended_word": "bicycle bicycle", "mask": [3, 4, 100, 20]},
    "111000000001": {"image_path": "1_change_object_80/111000000001.png", "original_prompt": "[a cat] on a bench",
                     "editing_prompt": "[a dog] on a bench", "editing_instruction": "change the cat to a dog",
                     "editing_type_id": "1", "blended_word": "", "mask": []},
}


def pie_bench(folder: Path, entries: dict | None = None) -> tuple[Path, Path]:
    """data/mapping_file.json and data/annotation_images/, as PnPInversion lays them out."""
    images = folder / "data" / "annotation_images"
    for entry in PIE_ENTRIES.values():
        png(images / entry["image_path"])
    path = folder / "data" / "mapping_file.json"
    path.write_text(json.dumps(PIE_ENTRIES if entries is None else entries))
    return path, images


# ------------------------------------------------------------------------------------------------ the formats

@pytest.mark.parametrize("kind", ["json", "toml"])
def test_batch_lists_keep_their_keys_and_name_their_entries_by_image(tmp_path, kind):
    red, blue = png(tmp_path / "pics" / "red.png"), png(tmp_path / "blue.png")
    path = tmp_path / f"edits.{kind}"
    if kind == "json":
        path.write_text(json.dumps([{"image": "pics/red.png", "source": "a red square", "targets": ["a", "b"],
                                     "p2p": True, "xa": 0.5, "blend": ["red"]},
                                    {"id": "blue-1", "image": str(blue), "targets": ["c"]}]))
    else:
        path.write_text('[[edit]]\nimage = "pics/red.png"\nsource = "a red square"\ntargets = ["a", "b"]\n'
                        'p2p = true\nxa = 0.5\nblend = ["red"]\n\n'
                        f'[[edit]]\nid = "blue-1"\nimage = "{blue}"\ntargets = ["c"]\n')
    assert read_dataset(path) == [
        DatasetItem("red", tmp_path / "pics/red.png", "a red square", ["a", "b"], {"p2p": True, "xa": 0.5,
                                                                                   "blend": ["red"]}),
        DatasetItem("blue-1", blue, "", ["c"])]
    other = tmp_path / "elsewhere"
    png(other / "pics" / "red.png")
    assert read_dataset(path, image_root=other)[0].image == other / "pics/red.png"
    assert red.is_file()


def test_the_authors_yaml(tmp_path):
    items = read_dataset(authors_yaml(tmp_path))
    assert items == [
        DatasetItem("horse_mud", tmp_path / "example_images/horse_mud.png", "a photo of a horse in the mud",
                     ["a photo of a horse in the snow", "a photo of a zebra in the mud"]),
        DatasetItem("cat", tmp_path / "example_images/cat.png", "", ["a photo of a dog"])]
    assert [item.entry for item in items] == ["entry 1", "entry 2"]   # messages name them by position


def test_pie_bench_prompts_lose_their_brackets_and_keep_what_they_marked(tmp_path):
    path, images = pie_bench(tmp_path)
    first, second = read_dataset(path, image_root=images)
    assert first == DatasetItem(
        "000000000000", images / "0_random_140/000000000000.png", "a slanted mountain bicycle on the road",
        ["a slanted rusty mountain bicycle on the road"],
        pie=PieAnnotation(editing_type_id="0", instruction="Make the frame of the bike rusty", source_words=(),
                          edited_words=("rusty",), blended_words=("bicycle", "bicycle"), mask_rle=(3, 4, 100, 20)))
    assert (second.id, second.source, second.targets) == ("111000000001", "a cat on a bench", ["a dog on a bench"])
    assert (second.pie.source_words, second.pie.edited_words, second.pie.blended_words) == (("a cat",), ("a dog",), ())


def test_ids_are_stable_when_entries_are_added_before_them(tmp_path):
    """An id is the entry's "id", else its image's file name: never its position."""
    png(tmp_path / "a.png"), png(tmp_path / "b.png"), png(tmp_path / "c.png")
    path = tmp_path / "edits.json"
    path.write_text(json.dumps([{"image": "a.png", "targets": ["x"]},
                                {"id": "b2", "image": "b.png", "targets": ["y"]}]))
    before = [item.id for item in read_dataset(path)]
    path.write_text(json.dumps([{"image": "c.png", "targets": ["z"]}, {"image": "a.png", "targets": ["x"]},
                                {"id": "b2", "image": "b.png", "targets": ["y"]},
                                {"image": "b.png", "targets": ["w"]}]))
    assert before == ["a", "b2"] and [item.id for item in read_dataset(path)] == ["c", "a", "b2", "b"]


def test_the_api_names_image_root(tmp_path):
    path, _ = pie_bench(tmp_path)
    with pytest.raises(InputError, match="PIE-Bench's mapping file: .* pass image_root$"):
        read_dataset(path)


# ------------------------------------------------------------------------------------------------ masks

def reference_mask(encoded: list[int], shape=(512, 512)) -> np.ndarray:
    """PnPInversion's mask_decode restated: each (start, length) marks min(length, pixels - start) pixels from start
    in the flattened picture; then the first and last row and column are marked whatever the encoding says."""
    pixels = shape[0] * shape[1]
    flat = [0.0] * pixels
    for k in range(0, len(encoded), 2):
        start = encoded[k]
        count = min(encoded[k + 1], pixels - start)
        for offset in range(max(count, 0)):
            flat[start + offset] = 1.0
    rows = [flat[r * shape[1]:(r + 1) * shape[1]] for r in range(shape[0])]
    for r in range(shape[0]):
        for c in range(shape[1]):
            if r in (0, shape[0] - 1) or c in (0, shape[1] - 1):
                rows[r][c] = 1.0
    return np.array(rows)


RNG = np.random.default_rng(0)
MASKS = {   # name -> (encoding, shape)
    "empty: the border only": ([], (6, 7)),
    "one run inside": ([9, 3], (5, 6)),
    "a run over a row's end": ([10, 5], (5, 6)),
    "a run that overflows the end": ([16, 50], (5, 6)),    # from inside the picture: pixels 16..29, no more
    "a run that starts past the end": ([31, 4, 8, 1], (5, 6)),
    "runs of length 0 and overlapping": ([7, 0, 7, 4, 9, 4], (5, 6)),
    "one row": ([2, 2], (1, 8)),
    "512 x 512, many runs": ([int(v) for pair in zip(RNG.integers(0, 512 * 512 + 100, 40), RNG.integers(0, 9000, 40))
                              for v in pair] + [512 * 500, 9000], (512, 512)),
}


@pytest.mark.parametrize("case", list(MASKS))
def test_pie_masks_decode_as_the_reference_does(case):
    encoded, shape = MASKS[case]
    mask = decode_pie_mask(encoded, shape)
    assert mask.dtype == bool and mask.shape == shape
    assert np.array_equal(mask, reference_mask(encoded, shape).astype(bool))


def test_pie_mask_by_hand():
    """Worked out on paper: 4 x 5, runs (6, 2) and (17, 9): pixels 6, 7 and 17..19 (the last three), plus the border."""
    expected = np.array([[1, 1, 1, 1, 1],
                         [1, 1, 1, 0, 1],
                         [1, 0, 0, 0, 1],
                         [1, 1, 1, 1, 1]], dtype=bool)
    assert np.array_equal(decode_pie_mask([6, 2, 17, 9], (4, 5)), expected)
    assert decode_pie_mask([]).sum() == 4 * 511   # the border of 512 x 512


@pytest.mark.parametrize("rle, shape, words", [([1, 2, 3], (4, 4), "in pairs"), ([-1, 2], (4, 4), "non-negative"),
                                               ([1.5, 2], (4, 4), "integers"), ([True, 2], (4, 4), "integers"),
                                               ([0, 1], (0, 4), "two positive integers")])
def test_bad_pie_masks_are_refused(rle, shape, words):
    with pytest.raises(InputError, match=words):
        decode_pie_mask(rle, shape)


# ------------------------------------------------------------------------------------------------ the command line

def metadata(path: Path) -> dict:
    with Image.open(path) as img:
        return json.loads(img.text["efddpm"])


def test_batch_runs_the_authors_yaml_and_pie_bench(tmp_path, model):
    fast = ["--model", str(model), *FAST]
    assert main(["batch", str(authors_yaml(tmp_path / "authors")), "--out", str(tmp_path / "a"), *fast]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["cat_1.png", "horse_mud_1.png", "horse_mud_2.png",
                                                                  "manifest.jsonl"]
    assert metadata(tmp_path / "a" / "cat_1.png")["source"] == ""
    path, images = pie_bench(tmp_path / "pie")
    assert main(["batch", str(path), "--image-root", str(images), "--out", str(tmp_path / "p"), *fast]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["000000000000_1.png", "111000000001_1.png",
                                                                  "manifest.jsonl"]
    settings = metadata(tmp_path / "p" / "111000000001_1.png")
    assert (settings["source"], settings["target"]) == ("a cat on a bench", "a dog on a bench")


def tree(folder: Path) -> list:
    return sorted((str(p.relative_to(folder)), p.is_dir()) for p in folder.rglob("*"))


def write_list(tmp: Path, entries, name="edits.json") -> Path:
    png(tmp / "red.png")
    path = tmp / name
    path.write_text(json.dumps(entries))
    return path


def write_yaml(tmp: Path, text: str) -> Path:
    png(tmp / "root" / "horse.png")
    path = tmp / "root" / "test.yaml"
    path.write_text(text)
    return path


def write_pie(tmp: Path, key: str, **changes) -> Path:
    entries = json.loads(json.dumps(PIE_ENTRIES))
    entries[key].update(changes)
    return pie_bench(tmp, entries)[0]


def with_dotdot(tmp: Path) -> Path:
    png(tmp / "red.png")
    return write_yaml(tmp, "- init_img: ../root/../red.png\n  target_prompts: [x]\n")


def with_repeated_key(tmp: Path) -> Path:
    path, _ = pie_bench(tmp)
    path.write_text('{"1": {}, "1": {}}')
    return path


def with_junk_image(tmp: Path) -> Path:
    path, images = pie_bench(tmp)
    (images / PIE_ENTRIES["000000000000"]["image_path"]).write_bytes(b"junk")
    return path


def with_symlink(tmp: Path) -> Path:
    png(tmp / "outside" / "secret.png")
    (tmp / "root").mkdir()
    (tmp / "root" / "link.png").symlink_to(tmp / "outside" / "secret.png")
    return write_yaml(tmp, "- init_img: link.png\n  target_prompts: [x]\n")


IMAGES = ["--image-root", "{images}"]
BAD_FILES = {   # name -> (make(tmp) -> the file, extra arguments, words of the message after "batch file FILE")
    "missing image": (lambda t: write_list(t, [{"image": "red.png", "targets": ["a"]},
                                               {"image": "nope.png", "targets": ["b"]}]), [],
                      ": entry 2: image not found: "),
    "path leading out of the root with ..": (with_dotdot, [],
                                             ": entry 1: image '../root/../red.png' leads out of the image root"),
    "path leading out of the root by a symbolic link": (with_symlink, [],
                                                        ": entry 1: image 'link.png' leads out of the image root"),
    "PIE-Bench path leading out of its root": (lambda t: write_pie(t, "111000000001", image_path="../../red.png"),
                                               IMAGES, ": entry '111000000001': image '../../red.png' leads out"),
    "empty target prompt": (lambda t: write_list(t, [{"image": "red.png", "targets": ["a", " "]}]), [],
                            ": entry 1: prompt 2 of targets is empty"),
    "blank source prompt in the YAML": (lambda t: write_yaml(t, "- init_img: horse.png\n  source_prompt: '  '\n"
                                                                "  target_prompts: [x]\n"), [],
                                        ": entry 1: source_prompt is empty (leave it out for no source guidance)"),
    "PIE-Bench prompt of brackets only": (lambda t: write_pie(t, "000000000000", editing_prompt="[ ]"), IMAGES,
                                          ": entry '000000000000': editing_prompt is empty"),
    "duplicate id": (lambda t: write_list(t, [{"id": "2", "image": "red.png", "targets": ["a"]},
                                              {"id": "2", "image": "red.png", "targets": ["b"]}]), [],
                     ": entry 2 repeats the id '2' of entry 1; ids must be unique"),
    "two images of one file name, no ids": (lambda t: png(t / "sub" / "red.png") and write_list(
                                                t, [{"image": "red.png", "targets": ["a"]},
                                                    {"image": "sub/red.png", "targets": ["b"]}]), [],
                                            ": entry 2 repeats the id 'red' of entry 1; an entry without an \"id\" is "
                                            "named by its image's file name: give these entries distinct \"id\"s"),
    "an id taken by another entry's image name": (lambda t: write_list(t, [{"image": "red.png", "targets": ["a"]},
                                                                           {"id": "red", "image": "red.png",
                                                                            "targets": ["b"]}]), [],
                                                  ": entry 2 repeats the id 'red' of entry 1; an entry without"),
    "image file name that is no id": (lambda t: png(t / "my red.png") and write_list(
                                          t, [{"image": "red.png", "targets": ["a"]},
                                              {"image": "my red.png", "targets": ["b"]}]), [],
                                      ": entry 2: an entry without an \"id\" is named by its image's file name, and "
                                      "'my red' is not an id"),
    "duplicate PIE-Bench id": (with_repeated_key, IMAGES, ": the key '1' is given twice in one object"),
    "id of the wrong type": (lambda t: write_list(t, [{"id": 7, "image": "red.png", "targets": ["a"]}]), [],
                             ": entry 1: the id must be a string of letters, digits"),
    "id with a slash": (lambda t: write_list(t, [{"id": "a/b", "image": "red.png", "targets": ["a"]}]), [],
                        ": entry 1: the id must be a string"),
    "target prompts not a list": (lambda t: write_yaml(t, "- init_img: horse.png\n  target_prompts: a dog\n"), [],
                                  ": entry 1: target_prompts must be a non-empty list of prompts, got 'a dog'"),
    "source prompt a number": (lambda t: write_yaml(t, "- init_img: horse.png\n  source_prompt: 3\n"
                                                       "  target_prompts: [x]\n"), [],
                               ": entry 1: source_prompt must be a string, got 3"),
    "YAML entry without targets": (lambda t: write_yaml(t, "- init_img: horse.png\n"), [],
                                   ": entry 1 lacks target_prompts"),
    "YAML entry with the batch list's keys": (lambda t: write_yaml(t, "- image: horse.png\n  targets: [x]\n"), [],
                                              ": entry 1 has unknown key 'image' (known: id, init_img"),
    "YAML not a list": (lambda t: write_yaml(t, "init_img: horse.png\n"), [], " must hold a non-empty list of edits"),
    "YAML syntax": (lambda t: write_yaml(t, "- init_img: [horse.png\n  target_prompts: x\n"), [],
                    " is not valid YAML: "),
    "PIE-Bench type id a number": (lambda t: write_pie(t, "111000000001", editing_type_id=1), IMAGES,
                                   ": entry '111000000001': editing_type_id must be a string, got 1"),
    "PIE-Bench mask of odd length": (lambda t: write_pie(t, "000000000000", mask=[1, 2, 3]), IMAGES,
                                     ": entry '000000000000': mask must be a run-length encoding"),
    "PIE-Bench entry without its mask": (lambda t: pie_bench(t, {k: {f: v for f, v in e.items() if f != "mask"}
                                                                 for k, e in PIE_ENTRIES.items()})[0], IMAGES,
                                         ": entry '000000000000' lacks mask"),
    "PIE-Bench without --image-root": (lambda t: pie_bench(t)[0], [],
                                       " is PIE-Bench's mapping file: its image paths are relative to the folder of "
                                       "its images (annotation_images); pass --image-root"),
    "unknown format": (lambda t: write_list(t, [], name="edits.txt"), [], ": unknown type '.txt'"),
    "image that does not decode": (with_junk_image, IMAGES, ": entry '000000000000': not an image: "),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_refused_in_one_line_naming_file_and_entry(tmp_path, capsys, model, case):
    make, extra, words = BAD_FILES[case]
    path = make(tmp_path)
    extra = [a.format(images=tmp_path / "data" / "annotation_images") for a in extra]
    before = tree(tmp_path)
    code = main(["batch", str(path), *extra, "--model", str(model), "--out", str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"efddpm: error: batch file {path}{words}"), err
    assert tree(tmp_path) == before


def test_yaml_without_pyyaml(tmp_path, capsys, model, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)      # `import yaml` fails, as where PyYAML is not installed
    path = authors_yaml(tmp_path)
    before = tree(tmp_path)
    assert main(["batch", str(path), "--model", str(model), "--out", str(tmp_path / "out"), *FAST]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"efddpm: error: batch file {path}: reading YAML needs PyYAML: pip install 'efddpm[yaml]'"]
    assert tree(tmp_path) == before


def test_an_image_root_that_does_not_exist(tmp_path, capsys, model):
    path, _ = pie_bench(tmp_path)
    before = tree(tmp_path)
    assert main(["batch", str(path), "--image-root", str(tmp_path / "nowhere"), "--model", str(model), "--out",
                 str(tmp_path / "out"), *FAST]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"efddpm: error: --image-root {tmp_path / 'nowhere'} is not a folder"]
    assert tree(tmp_path) == before
