"""The manifest of a dataset run: JSON Lines in the output folder, appended as the run goes, read back to resume.

    manifest.jsonl                  an unsharded run's manifest, and the merge of a sharded run's parts
    manifest.shard-I-of-N.jsonl     the part of shard I of N (--shard I/N, or rank I of N under torchrun)

One JSON object a line; "kind" says which:
    run      a process begins work         settings, shard, efddpm_version
    output   an output is in place         id, k, image, source, target, options (the entry's own P2P keys),
                                           output (its name in the folder), sha256, item_seed, seconds (the item's
                                           share of its batch's time: inversions and edits), batch (items made
                                           together), settings
    failed   an item failed, nothing of    id, image, source, targets, options, error (one line), item_seed,
             it was written                seconds, batch, settings
    summary  a process finished            settings, shard, items, done, failed, missing, outputs, seconds
Every line carries the run's settings (the flags that make the pictures, and the run seed), so one line read alone
says what made it; a setting added by a later version (ADDED_SETTINGS) is read, where a line lacks it, as what its
run did, so runs of earlier versions resume. An item's lines are appended in one write, flushed and synced, only after its PNGs are in place.
A process killed while appending leaves at worst a torn last line: readers skip every line that is not a JSON
object of a known kind, and the next appender cuts a torn tail off before it writes. At the end of a run that
merges (unsharded, or rank 0 under torchrun) manifest.jsonl is rewritten all or nothing from every manifest of the
folder and the parts are removed: a run line, one output line per output in place, the failed line of each item
that is still not done, and a summary line.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from efddpm.core.atomic import OutputError, write_atomically

MANIFEST = "manifest.jsonl"
# run settings that later versions added, as the runs that recorded none of them made their pictures: every batch
# edited one picture at a time (the bytes of --batch-size 1) by edit-friendly inversion
ADDED_SETTINGS = {"method": "edit-friendly", "batch_size": 1, "compile": False}
PART = re.compile(r"manifest\.shard-(\d+)-of-(\d+)\.jsonl")
KINDS = ("run", "output", "failed", "summary")


def part_name(index: int, count: int) -> str:
    """The manifest file of shard index of count (count 1: the run's own manifest.jsonl)."""
    return MANIFEST if count == 1 else f"manifest.shard-{index}-of-{count}.jsonl"


def manifest_files(folder: Path) -> list[Path]:
    """The folder's manifest.jsonl, then its parts in name order."""
    parts = sorted(p for p in folder.glob("manifest.shard-*.jsonl") if PART.fullmatch(p.name))
    return [p for p in [folder / MANIFEST, *parts] if p.is_file()]


@dataclass(frozen=True)
class Record:
    """One line of a manifest, and the file it came from."""
    line: dict
    file: Path

    @property
    def kind(self) -> str:
        return self.line["kind"]


def json_objects(path: Path) -> list[dict]:
    """The lines of a JSON Lines file that are JSON objects (a torn or foreign line is skipped)."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise OutputError(f"cannot read {path}: {e.strerror or e}") from None
    objects = []
    for raw in text.split("\n"):
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            objects.append(line)
    return objects


def read_records(folder: Path) -> list[Record]:
    """Every well-formed line of every manifest of the folder (a torn or foreign line is skipped)."""
    records = []
    for path in manifest_files(folder):
        for line in json_objects(path):
            if line.get("kind") in KINDS and isinstance(line.get("settings"), dict):
                line["settings"] = {**ADDED_SETTINGS, **line["settings"]}    # an earlier version's run resumes
                records.append(Record(line, path))
    return records


def sha256(path: Path) -> str | None:
    """The file's SHA-256 (hex), None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:          # missing, a folder, unreadable: not the file a line lists
        return None


def verified(folder: Path, records: list[Record]) -> dict[tuple[str, int], Record]:
    """(id, k) -> the latest output line whose file is in place with the recorded SHA-256."""
    found, digests = {}, {}
    for record in records:
        line = record.line
        if record.kind != "output" or not isinstance(line.get("output"), str) or "/" in line["output"]:
            continue                     # an output line names a file of the folder, nothing else
        if line["output"] not in digests:
            digests[line["output"]] = sha256(folder / line["output"])
        if digests[line["output"]] == line.get("sha256"):
            found[(line.get("id"), line.get("k"))] = record
    return found


class Appender:
    """Appends lines to one manifest file: each call one write of whole lines, flushed and synced."""

    def __init__(self, path: Path):
        """Opens the file (created if missing), cutting a torn last line off first."""
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = path.read_bytes() if path.exists() else b""
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
            end = data.rfind(b"\n") + 1
            if end != len(data):
                os.ftruncate(self.fd, end)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None

    def append(self, *lines: dict) -> None:
        data = "".join(json.dumps(line, allow_nan=False) + "\n" for line in lines).encode("utf-8")
        try:
            if os.write(self.fd, data) != len(data):
                raise OSError(28, "short write (disk full?)")
            os.fsync(self.fd)
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from None

    def close(self) -> None:
        os.close(self.fd)


def merge(folder: Path, ids: list[tuple[str, int]], settings: dict, head: dict, tail: dict) -> dict:
    """Rewrite manifest.jsonl from every manifest of the folder, all or nothing, then remove the parts.

    Kept, of the lines with these settings: one output line for each output in place with its recorded SHA-256
    (`ids`' (id, n targets) first, in order, then the others), the latest failed line of each item of `ids` that
    is not complete; between `head` (the run line) and a summary line (`tail` plus the counts). Returns the
    summary line."""
    records = [r for r in read_records(folder) if r.line["settings"] == settings]
    found = verified(folder, records)
    failures = {r.line.get("id"): r.line for r in records if r.kind == "failed"}
    lines, listed, counts = [head], set(), {"items": len(ids), "done": 0, "failed": 0, "missing": 0}
    for item_id, n in ids:
        keys = [(item_id, k) for k in range(1, n + 1)]
        lines += [found[key].line for key in keys if key in found]
        listed.update(keys)
        state = "done" if all(key in found for key in keys) else "failed" if item_id in failures else "missing"
        counts[state] += 1
        if state == "failed":
            lines.append(failures[item_id])
    lines += [record.line for key, record in found.items() if key not in listed]
    summary = {"kind": "summary", **tail, **counts, "outputs": sum(line["kind"] == "output" for line in lines),
               "settings": settings}
    lines.append(summary)
    write_atomically(folder / MANIFEST, lambda tmp: tmp.write_text(
        "".join(json.dumps(line, allow_nan=False) + "\n" for line in lines), encoding="utf-8"))
    for path in manifest_files(folder):
        if path.name != MANIFEST:
            path.unlink(missing_ok=True)
    return summary
