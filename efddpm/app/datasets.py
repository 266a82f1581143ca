"""Edit lists, read once: read_dataset(path) -> [DatasetItem], whatever format the file is in.

    .json, a list   efddpm's batch list: {"image", "source", "targets"} per edit, plus an entry's own P2P settings
                    and "mask": a picture of the region the edit may change (white; read by efddpm eval only)
    .toml           the same as [[edit]] tables
    .yaml / .yml    the authors' dataset file (DDPM_inversion's test.yaml): {init_img, source_prompt,
                    target_prompts} per edit; reading it needs PyYAML (pip install 'efddpm[yaml]')
    .json, a dict   PIE-Bench's mapping_file.json (PnPInversion's data/): id -> {image_path, original_prompt,
                    editing_prompt, ...}; its images lie in another folder, given as image_root

Ids are stable and unique in a file: an item's outputs are named <id>_<k>.png, its seed is derived from the run's
seed and its id, and its id picks its shard (efddpm.app.dataset_run). An entry of a batch list or of the authors'
YAML is named by its "id" key, else by its image's file name without the suffix (cat.png: "cat"); two entries
without an "id" whose images share a file name are refused (give them ids). A PIE-Bench entry's id is its key.
Ids are letters, digits, '.', '_' and '-', starting with a letter or a digit.

Image paths are relative to the root: image_root if given, else the file's folder. A batch list is the user's own:
its paths may also be absolute or lead out of the root, as always. The datasets (YAML, PIE-Bench) come from
elsewhere: their paths must stay inside the root, after '..' and symbolic links; a leading '/' of init_img means
the root (the authors' main_run.py reads '.' + init_img).

The whole file is checked before any work; a bad one raises InputError, one line naming the file, the entry and
what is wrong.
"""
from __future__ import annotations

import json
import numbers
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from efddpm.core.checks import InputError

ENTRY_OPTIONS = ("p2p", "xa", "sa", "p2p_window", "blend", "reweight")  # a list entry's own P2P settings, over the
LIST_KEYS = ("id", "image", "source", "targets", "mask", *ENTRY_OPTIONS)  # flags of the same names
YAML_KEYS = ("id", "init_img", "source_prompt", "target_prompts")
PIE_KEYS = ("image_path", "original_prompt", "editing_prompt", "editing_instruction", "editing_type_id",
            "blended_word", "mask")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
BRACKETED = re.compile(r"\[([^\[\]]*)\]")


@dataclass(frozen=True)
class PieAnnotation:
    """What PIE-Bench says about an edit besides its prompts."""
    editing_type_id: str                # "0" (random) .. "9" (change style)
    instruction: str                    # editing_instruction, e.g. "Make the frame of the bike rusty"
    source_words: tuple[str, ...]       # the [bracketed] parts of original_prompt
    edited_words: tuple[str, ...]       # the [bracketed] parts of editing_prompt, e.g. ("rusty",)
    blended_words: tuple[str, ...]      # blended_word split on spaces, e.g. ("bicycle", "bicycle"); () if empty
    mask_rle: tuple[int, ...]           # the edited region, for decode_pie_mask


@dataclass(frozen=True)
class DatasetItem:
    """One image and its edits."""
    id: str                             # unique in its file and stable (see the module's notes)
    image: Path                         # the picture: the root joined with the path the file gives
    source: str                         # "" = no source guidance (batch lists and the authors' YAML allow it)
    targets: list[str]                  # one or more target prompts, none blank
    options: dict = field(default_factory=dict)   # a list entry's own keys of ENTRY_OPTIONS, as written
    pie: PieAnnotation | None = None    # PIE-Bench's annotation
    mask: Path | None = None            # a batch list's "mask": the region the edit may change (white), for eval
    entry: str = field(default="", compare=False)   # how messages name it: "entry 3" (its position) or, where the
                                                    # file gives the id, "entry 'blue-1'" (entry_name)


def entry_name(index: int, item_id: str | None = None) -> str:
    """How errors name an entry: by the id the file gives it, else by its position (1, 2, ...)."""
    return f"entry {index}" if item_id is None else f"entry {item_id!r}"


def read_dataset(path: str | Path, *, image_root: str | Path | None = None,
                 image_root_name: str = "image_root") -> list[DatasetItem]:
    """The items of an edit list in any of the formats above, checked. image_root_name: how errors name the
    image root (the command line's --image-root)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"batch file not found: {path}")
    if image_root is not None and not Path(image_root).is_dir():
        raise InputError(f"{image_root_name} {image_root} is not a folder")
    root = Path(image_root) if image_root is not None else path.parent
    entries = parse(path)
    if isinstance(entries, dict):
        if image_root is None:
            raise InputError(f"batch file {path} is PIE-Bench's mapping file: its image paths are relative to the "
                             f"folder of its images (annotation_images); pass {image_root_name}")
        items = [pie_item(path, root, index, key, entry) for index, (key, entry) in enumerate(entries.items(), 1)]
    elif path.suffix in (".yaml", ".yml"):
        items = [yaml_item(path, root, index, entry) for index, entry in enumerate(entries, 1)]
    else:
        items = [list_item(path, root, index, entry) for index, entry in enumerate(entries, 1)]
    first = {}
    for index, item in enumerate(items, 1):
        if item.id in first:
            other = first[item.id]
            by_image = item.entry == entry_name(index) or items[other - 1].entry == entry_name(other)
            raise InputError(f"batch file {path}: entry {index} repeats the id {item.id!r} of entry {other}; "
                             + ("an entry without an \"id\" is named by its image's file name: give these entries "
                                "distinct \"id\"s" if by_image else "ids must be unique"))
        first[item.id] = index
    return items


# ------------------------------------------------------------------------------------------------ the file

class RepeatedKey(Exception):
    """A JSON object gives a key twice (args: the key)."""


def unique_keys(pairs: list[tuple]) -> dict:
    """json.loads's object_pairs_hook: a key given twice is an error (json would keep the last silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise RepeatedKey(key)
        out[key] = value
    return out


def parse(path: Path) -> list | dict:
    """The file's entries: a non-empty list, or (JSON) a non-empty dict of PIE-Bench entries."""
    if path.suffix not in (".json", ".toml", ".yaml", ".yml"):
        raise InputError(f"batch file {path}: unknown type {path.suffix or '(no suffix)'!r}; write it as .json (a "
                         "list of edits, or PIE-Bench's mapping_file.json), .toml ([[edit]] tables) or .yaml (the "
                         "authors' dataset file)")
    kind = "YAML" if path.suffix in (".yaml", ".yml") else path.suffix.lstrip(".").upper()
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            entries = tomllib.loads(text).get("edit")
        elif path.suffix == ".json":
            entries = json.loads(text, object_pairs_hook=unique_keys)
        else:
            entries = load_yaml(path, text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"batch file {path} is not valid {kind}: {e}") from None
    except OSError as e:
        raise InputError(f"batch file {path} cannot be read ({e.strerror})") from None
    except RepeatedKey as e:
        raise InputError(f"batch file {path}: the key {e.args[0]!r} is given twice in one object") from None
    if isinstance(entries, dict) and path.suffix == ".json" and entries:
        return entries
    if not isinstance(entries, list) or not entries:
        raise InputError(f"batch file {path} must hold a non-empty list of edits")
    return entries


def load_yaml(path: Path, text: str):
    try:
        import yaml
    except ImportError:
        raise InputError(f"batch file {path}: reading YAML needs PyYAML: pip install 'efddpm[yaml]'") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise InputError(f"batch file {path} is not valid YAML: {problem}{where}") from None


# ------------------------------------------------------------------------------------------------ the formats

def list_item(path: Path, root: Path, index: int, e) -> DatasetItem:
    """An entry of efddpm's batch list (JSON or TOML)."""
    where = f"batch file {path}: {entry_name(index)}"
    if isinstance(e, dict) and (unknown := sorted(set(e) - set(LIST_KEYS))):
        raise InputError(f"{where} has unknown key {unknown[0]!r} (known: {', '.join(LIST_KEYS)})")
    targets = e.get("targets") if isinstance(e, dict) else None
    if (not isinstance(e, dict) or not isinstance(e.get("image"), str) or not isinstance(e.get("source", ""), str)
            or not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets)):
        raise InputError(f"{where} must be {{\"image\": str, \"source\": str, \"targets\": [str, ...]}}")
    item_id, entry = item_name(e, e["image"], index, where)
    where = f"batch file {path}: {entry}"
    if "p2p" in e and not isinstance(e["p2p"], bool):
        raise InputError(f"{where}: p2p must be true or false, got {shown(e['p2p'])}")
    image = root / e["image"]
    check_image(image, where)
    if "mask" in e and not isinstance(e["mask"], str):
        raise InputError(f"{where}: mask must be a path, got {shown(e['mask'])}")
    mask = root / e["mask"] if "mask" in e else None
    if mask is not None:
        check_image(mask, f"{where}: mask")
    return DatasetItem(item_id, image, prompt(e.get("source", ""), "source", where, may_be_empty=True),
                       prompts(targets, "targets", where), {k: e[k] for k in ENTRY_OPTIONS if k in e}, mask=mask,
                       entry=entry)


def yaml_item(path: Path, root: Path, index: int, e) -> DatasetItem:
    """An entry of the authors' dataset file: source_prompt may be left out (= "", as in their main_run.py)."""
    where = f"batch file {path}: {entry_name(index)}"
    if not isinstance(e, dict):
        raise InputError(f"{where} must be a mapping {{init_img, source_prompt, target_prompts}}, got {shown(e)}")
    if unknown := sorted(set(map(str, e)) - set(YAML_KEYS)):
        raise InputError(f"{where} has unknown key {unknown[0]!r} (known: {', '.join(YAML_KEYS)})")
    for key in ("init_img", "target_prompts"):
        if key not in e:
            raise InputError(f"{where} lacks {key}")
    if not isinstance(e["init_img"], str) or not e["init_img"].strip("/"):
        raise InputError(f"{where}: init_img must be a path, got {shown(e['init_img'])}")
    item_id, entry = item_name(e, e["init_img"], index, where)
    where = f"batch file {path}: {entry}"
    image = inside(root, e["init_img"].lstrip("/"), where)
    return DatasetItem(item_id, image, prompt(e.get("source_prompt", ""), "source_prompt", where, may_be_empty=True),
                       prompts(e["target_prompts"], "target_prompts", where), entry=entry)


def pie_item(path: Path, root: Path, index: int, key: str, e) -> DatasetItem:
    """A PIE-Bench entry: prompts without their [brackets] (as PnPInversion feeds them), the bracketed parts kept."""
    where = f"batch file {path}: {entry_name(index, key)}"
    check_id(key, where)
    if not isinstance(e, dict):
        raise InputError(f"{where} must be an object {{{', '.join(PIE_KEYS)}}}, got {shown(e)}")
    if unknown := sorted(set(e) - set(PIE_KEYS)):
        raise InputError(f"{where} has unknown key {unknown[0]!r} (known: {', '.join(PIE_KEYS)})")
    if missing := [k for k in PIE_KEYS if k not in e]:
        raise InputError(f"{where} lacks {missing[0]}")
    for k in PIE_KEYS:
        if k != "mask" and not isinstance(e[k], str):
            raise InputError(f"{where}: {k} must be a string, got {shown(e[k])}")
    source, target = (prompt(e[k].replace("[", "").replace("]", ""), k, where)
                      for k in ("original_prompt", "editing_prompt"))
    annotation = PieAnnotation(
        editing_type_id=e["editing_type_id"], instruction=e["editing_instruction"],
        source_words=tuple(BRACKETED.findall(e["original_prompt"])),
        edited_words=tuple(BRACKETED.findall(e["editing_prompt"])),
        blended_words=tuple(e["blended_word"].split(" ")) if e["blended_word"] else (),
        mask_rle=run_lengths(e["mask"], f"{where}: mask"))
    return DatasetItem(key, inside(root, e["image_path"], where), source, [target], pie=annotation,
                       entry=entry_name(index, key))


# ------------------------------------------------------------------------------------------------ the checks

def item_name(e: dict, image: str, index: int, where: str) -> tuple[str, str]:
    """A list or YAML entry's id (its "id", else its image's file name without the suffix) and how messages name
    it (entry_name: by the id the file gives, else by position)."""
    if "id" in e:
        return check_id(e["id"], where), entry_name(index, e["id"])
    stem = Path(image).stem
    if not ID_PATTERN.fullmatch(stem):
        raise InputError(f"{where}: an entry without an \"id\" is named by its image's file name, and {stem!r} is "
                         "not an id (letters, digits, '.', '_' and '-', starting with a letter or a digit); give "
                         "the entry an \"id\"")
    return stem, entry_name(index)


def check_id(value, where: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InputError(f"{where}: the id must be a string of letters, digits, '.', '_' and '-' that starts with a "
                         f"letter or a digit, got {shown(value)}")
    return value


def prompt(value, key: str, where: str, may_be_empty: bool = False) -> str:
    """A prompt: a string with some text ("" too for a source where may_be_empty: no source guidance)."""
    if not isinstance(value, str):
        raise InputError(f"{where}: {key} must be a string, got {shown(value)}")
    if not value.strip() and not (may_be_empty and value == ""):
        raise InputError(f"{where}: {key} is empty" + (" (leave it out for no source guidance)" if may_be_empty
                                                         else ""))
    return value


def prompts(value, key: str, where: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: {key} must be a non-empty list of prompts, got {shown(value)}")
    return [prompt(v, f"prompt {i} of {key}", where) for i, v in enumerate(value, 1)]


def shown(value) -> str:
    """A value as errors quote it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_image(image: Path, where: str) -> None:
    if not image.exists():
        raise InputError(f"{where}: image not found: {image}")
    if not image.is_file():
        raise InputError(f"{where}: image {image} is not a file")


def inside(root: Path, relative: str, where: str) -> Path:
    """root / relative, which must stay inside root once '..' and symbolic links are followed, and exist."""
    image = root / relative
    if not image.resolve().is_relative_to(root.resolve()):
        raise InputError(f"{where}: image {relative!r} leads out of the image root {root}")
    check_image(image, where)
    return image


# ------------------------------------------------------------------------------------------------ PIE-Bench masks

def run_lengths(value, name: str) -> tuple[int, ...]:
    """[start, length, start, length, ...]: non-negative integers, in pairs."""
    if (not isinstance(value, (list, tuple)) or len(value) % 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise InputError(f"{name} must be a run-length encoding [start, length, ...] of non-negative integers in "
                         f"pairs, got {shown(value)}")
    return tuple(int(v) for v in value)


def decode_pie_mask(rle, shape: tuple[int, int] = (512, 512)) -> np.ndarray:
    """PIE-Bench's mask of the edited region as a bool array of `shape`.

    rle is [start, length, ...] over the picture's pixels in row-major order, starts counted from 0; a run that
    passes the last pixel stops there, one that starts past it marks nothing. As in PnPInversion's mask_decode,
    the outermost rows and columns are always marked: the reference does so "to avoid annotation errors in
    boundary", and its metrics read the masks that way."""
    runs = run_lengths(rle, "rle")
    if (not isinstance(shape, (list, tuple)) or len(shape) != 2
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise InputError(f"shape must be (height, width), two positive integers, got {shape!r}")
    height, width = int(shape[0]), int(shape[1])
    flat = np.zeros(height * width, dtype=bool)
    for start, length in zip(runs[0::2], runs[1::2]):
        flat[start:start + length] = True            # a slice stops at the end of the array
    mask = flat.reshape(height, width)
    mask[[0, -1], :] = True
    mask[:, [0, -1]] = True
    return mask
