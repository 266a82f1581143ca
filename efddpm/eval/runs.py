"""What `efddpm eval` measures: the edits of result folders, each edit beside its input, prompt and region.

A run is one folder written by `efddpm batch` (its manifest.jsonl, efddpm.app.manifest): one method at one
setting. Its edits are the output lines whose PNG is in place with the recorded SHA-256 (failed and missing items
are left out and counted). Each edit is measured against its input picture, read as the edit read it
(efddpm.app.images.load_image at the edit's size: the same resize and centre crop), so an edit of a 512 x 512
PIE-Bench image is measured against the image itself.

Where the edit list is given (--dataset, the file the runs were made from; PIE-Bench's with --image-root), the
items' own paths, masks and PIE-Bench annotations are used: the region of an edit is PIE-Bench's decoded mask
(efddpm.app.datasets.decode_pie_mask, border rule included), or a batch list's "mask" picture (white = the region
the edit may change) read at the edit's size, thresholded at half (a PIE-Bench mask is decoded at 512 x 512, its
pictures' size, and resized to the edit's by nearest neighbour). Without a region the background metrics
are not defined for that edit.

A pair of folders (--pair SOURCES EDITS) is a run too: each PNG of EDITS is measured against the picture of the same
name in SOURCES, its prompt from --prompts (a JSON object: file name -> target prompt), if given.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from efddpm.app.datasets import DatasetItem, decode_pie_mask
from efddpm.app.images import load_image, to_uint8
from efddpm.app.manifest import read_records, sha256, verified
from efddpm.core.checks import InputError
from efddpm.eval.pixels import rgb_pixels

PICTURES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Edit:
    """One edited picture and what it is measured against."""
    key: str                      # unique in the run: "<id>_<k>" (a batch run) or the file name (a pair)
    edit: Path                    # the edited picture
    digest: str                   # its SHA-256: a score is reused only for the same bytes
    source: Path                  # the input picture
    target: str | None            # the target prompt (None: not known; the CLIP scores need it)
    item: DatasetItem | None = None   # the dataset's item, when --dataset is given

    @property
    def edit_type(self) -> str | None:
        """PIE-Bench's editing_type_id ("0" .. "9"), None outside PIE-Bench."""
        return self.item.pie.editing_type_id if self.item is not None and self.item.pie is not None else None

    def pictures(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, edit) as uint8 [3, S, S]: the input resized and cropped as the edit's input was."""
        edit = rgb_pixels(self.edit)                                              # uint8 [3, H, W]
        side = edit.shape[-1]
        if edit.shape[-2] != side:
            raise InputError(f"{self.edit}: an edit is square, this one is {edit.shape[-1]}x{edit.shape[-2]}")
        return as_uint8(self.source, side), edit

    def region(self, side: int) -> torch.Tensor | None:
        """The edited region as float [side, side] of 0 and 1, None where the dataset gives none."""
        if self.item is None:
            return None
        if self.item.pie is not None:                  # PIE-Bench's masks are of its 512 x 512 pictures
            mask = torch.from_numpy(decode_pie_mask(self.item.pie.mask_rle).astype(np.float32))    # [512, 512]
            mask = F.interpolate(mask[None, None], size=(side, side), mode="nearest")[0, 0]       # [side, side]
            mask[[0, -1], :], mask[:, [0, -1]] = 1, 1          # the reference's border rule, at the edit's size
            return mask
        if self.item.mask is not None:
            mask = as_uint8(self.item.mask, side).float().mean(0)           # [side, side]
            return (mask >= 127.5).float()
        return None


def as_uint8(path: Path, side: int) -> torch.Tensor:
    """A picture read as efddpm reads an input at `side` pixels, as uint8 [3, side, side]."""
    pixels, _ = load_image(path, side)                                              # [1, 3, side, side] in [-1, 1]
    return to_uint8(pixels)[0]


def run_edits(folder: Path, items: dict[str, DatasetItem] | None) -> tuple[list[Edit], dict, int]:
    """A batch run's edits in the manifest's order, its settings, and the number of its outputs not in place."""
    if not folder.is_dir():
        raise InputError(f"run folder not found: {folder}")
    records = read_records(folder)
    if not records:
        raise InputError(f"{folder} has no manifest.jsonl: give a folder written by efddpm batch, or --pair")
    settings = records[-1].line["settings"]
    if any(r.line["settings"] != settings for r in records):
        raise InputError(f"{folder}: its manifests record several settings; let efddpm batch finish (or resume) the "
                         "run first")
    found = verified(folder, records)
    listed = {(r.line.get("id"), r.line.get("k")) for r in records if r.kind == "output"}
    edits = []
    for (item_id, k), record in found.items():
        line = record.line
        item = None
        if items is not None:
            if item_id not in items:
                raise InputError(f"{folder}: edit {line['output']} is of item {item_id!r}, which the dataset lacks: "
                                 "give the file the run was made from")
            item = items[item_id]
        source = item.image if item is not None else Path(line["image"])
        if not source.is_file():
            raise InputError(f"{folder}: the input of {line['output']} is not found: {source} (the manifest's path; "
                             "run eval where batch ran, or give --dataset)")
        edits.append(Edit(f"{item_id}_{k}", folder / line["output"], line["sha256"], source, line.get("target"),
                          item))
    return edits, settings, len(listed - found.keys())


def pair_edits(sources: Path, folder: Path, prompts: Path | None) -> list[Edit]:
    """The pictures of `folder`, each against the picture of the same name in `sources`."""
    for path in (sources, folder):
        if not path.is_dir():
            raise InputError(f"--pair: folder not found: {path}")
    targets = read_prompts(prompts) if prompts is not None else {}
    edits = []
    for edit in sorted(p for p in folder.iterdir() if p.suffix.lower() in PICTURES):
        source = sources / edit.name
        if not source.is_file():
            raise InputError(f"--pair: {edit} has no input of the same name in {sources}")
        edits.append(Edit(edit.name, edit, sha256(edit) or "", source, targets.get(edit.name)))
    if not edits:
        raise InputError(f"--pair: {folder} holds no pictures")
    return edits


def read_prompts(path: Path) -> dict[str, str]:
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"--prompts {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise InputError(f"--prompts {path} must be a JSON object: file name -> target prompt")
    return prompts
