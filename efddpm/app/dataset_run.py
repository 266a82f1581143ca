"""A dataset run (`efddpm batch`): a dataset's items edited in batches (efddpm.app.batched), resumable, and shardable
over processes.

Batches. The items to do, in the file's order, go in batches of at most --batch-size of one kind (efddpm.app.batched.
kind); a batch's items are written and listed one by one once the batch is made, so a killed process loses at most
the batch in flight.

Seeds. The run seed is --seed; without it a rerun takes the one its manifest records (efddpm.app.manifest), and a
new run draws one at random (rank 0's under torchrun). Each item draws its noise from its own seed:

    item_seed = the first 8 bytes of SHA-256("efddpm item seed:<run seed>:<id>"), big-endian, top bit cleared

so an item's pictures do not depend on its position in the file, on the other items or on the shard running it.

Names. An item's outputs are <id>_<k>.png in the output folder, k = 1, 2, ... in the order of its targets.

Shards. The item `id` belongs to shard  int(first 8 bytes of SHA-256("efddpm shard:<id>")) mod N: by id, never
by position. `--shard I/N` runs shard I and appends to manifest.shard-I-of-N.jsonl. Under torchrun (RANK,
WORLD_SIZE and LOCAL_RANK set) the rank and world size play I and N, --device cuda means cuda:LOCAL_RANK, and
rank 0 merges the parts into manifest.jsonl once a barrier says every rank is done (gloo on the CPU, nccl on
CUDA). An unsharded run merges too: run it once the separate shards are done and it finds their outputs done.

Resume. A run reads every manifest in the folder. Lines written with other settings (model, device type, dtype,
method, steps, guidance, P2P flags, seed, ...) stop it before any work unless --overwrite. An output is done when a line
lists it with its file in place, the recorded SHA-256, and the inputs (image, prompts, the entry's own P2P keys)
that its entry gives now. An item is made again unless all its outputs are done: a failed one, one a process was
killed in, one whose entry changed. A file in the way of an output is replaced only when it is this run's (a line
lists it, or its PNG metadata names this item and these settings: the output in flight when a process was killed
between placing it and listing it); any other file stops the run before any work. --overwrite starts over: this
process's part, manifest.jsonl and the parts of another shard count are removed, and every output of this
process's items is made and replaced.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from efddpm.app.datasets import DatasetItem
from efddpm.app.manifest import MANIFEST, Appender, Record, manifest_files, merge, part_name, read_records, \
    sha256, verified
from efddpm.core.atomic import OutputError, Outputs
from efddpm.core.checks import MAX_SEED, InputError, out_of_memory
from efddpm.core.version import VERSION

WAIT = timedelta(days=7)   # how long the end barrier waits for the slowest rank


def item_seed(run_seed: int, item_id: str) -> int:
    digest = hashlib.sha256(f"efddpm item seed:{run_seed}:{item_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def shard_of(item_id: str, count: int) -> int:
    digest = hashlib.sha256(f"efddpm shard:{item_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def output_path(folder: Path, item_id: str, k: int) -> Path:
    return folder / f"{item_id}_{k}.png"


# ------------------------------------------------------------------------------------------------ shards

@dataclass(frozen=True)
class Shard:
    """Which items this process runs: those of shard `index` of `count`."""
    index: int = 0
    count: int = 1
    local_rank: int | None = None     # under torchrun: this process's GPU index (a process group joins the ranks)

    def owns(self, item_id: str) -> bool:
        return shard_of(item_id, self.count) == self.index

    @property
    def manifest(self) -> str:
        return part_name(self.index, self.count)

    @property
    def merges(self) -> bool:
        """Whether this process writes manifest.jsonl at the end: an unsharded run, or rank 0 under torchrun."""
        return self.count == 1 or (self.local_rank is not None and self.index == 0)

    @property
    def quiet(self) -> bool:
        """Ranks other than 0 show no progress bar and no notes."""
        return self.local_rank is not None and self.index != 0


def shard_from(flag: str | None, env) -> Shard:
    """--shard I/N, or torchrun's RANK, WORLD_SIZE and LOCAL_RANK; none of them: the whole dataset."""
    if "RANK" in env and "WORLD_SIZE" in env:
        if flag is not None:
            raise InputError("--shard cannot be used under torchrun: its RANK and WORLD_SIZE choose the shard")
        try:
            rank, size, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
        except ValueError:
            raise InputError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {env['RANK']!r}, "
                             f"{env['WORLD_SIZE']!r}, {env.get('LOCAL_RANK')!r}") from None
        if not 0 <= rank < size or local < 0:
            raise InputError(f"RANK {rank} and WORLD_SIZE {size}: need 0 <= RANK < WORLD_SIZE")
        return Shard(rank, size, local)
    if flag is None:
        return Shard()
    match = re.fullmatch(r"(\d+)/(\d+)", flag.strip())
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise InputError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {flag!r}")
    return Shard(int(match[1]), int(match[2]))


def shard_device(device: str, shard: Shard) -> str:
    """--device for this rank: under torchrun, cuda means cuda:LOCAL_RANK."""
    if shard.local_rank is None or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise InputError(f"under torchrun pass --device cuda (each rank takes cuda:LOCAL_RANK), not {device!r}")
    return f"cuda:{shard.local_rank}"


class Group:
    """torch.distributed's process group of a torchrun launch, for the run seed and the end barrier; nothing alone."""

    def __init__(self, shard: Shard, device: torch.device):
        self.shard, self.device, self.joined = shard, device, False

    def __enter__(self) -> "Group":
        if self.shard.local_rank is not None:
            import torch.distributed as dist
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", timeout=WAIT)
            self.joined = True
        return self

    def agree(self, value):
        """Rank 0's value, on every rank."""
        if not self.joined:
            return value
        import torch.distributed as dist
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.joined:
            import torch.distributed as dist
            dist.barrier(**({"device_ids": [self.device.index]} if self.device.type == "cuda" else {}))

    def __exit__(self, *exc) -> None:
        if self.joined:
            import torch.distributed as dist
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ the run

def inputs(item: DatasetItem, target: str | None = None) -> dict:
    """What a manifest line records of an item's inputs: one target's, or (target None) all of them."""
    return {"image": str(item.image), "source": item.source,
            **({"targets": item.targets} if target is None else {"target": target}), "options": item.options}


def matches(line: dict, item: DatasetItem, target: str) -> bool:
    """Whether an output line was made from the inputs that the item gives now."""
    return all(line.get(key) == value for key, value in inputs(item, target).items())


@dataclass
class DatasetRun:
    """What one process does: `todo` of its items (`mine`), the others being done earlier."""
    folder: Path
    items: list[DatasetItem]
    settings: dict                    # the run's settings, without its seed
    seed: int | None                  # the run seed: --seed, or the manifests'; None: to draw
    shard: Shard
    overwrite: bool
    mine: list[DatasetItem] = field(default_factory=list)
    todo: list[DatasetItem] = field(default_factory=list)
    replace: set = field(default_factory=set)      # ids of items whose outputs are in the way and will be replaced

    @classmethod
    def prepare(cls, folder: Path, items: list[DatasetItem], settings: dict, seed: int | None, shard: Shard,
                overwrite: bool) -> "DatasetRun":
        """Read the manifests and decide what to do, writing nothing; refuse (InputError) what does not fit."""
        run = cls(folder, items, json.loads(json.dumps(settings)), seed, shard, overwrite)
        run.mine = [item for item in items if shard.owns(item.id)]
        records = [] if overwrite else read_records(folder)
        run.seed = run.check_settings(records)
        if run.seed is None and shard.count > 1 and shard.local_rank is None:
            raise InputError(f"--shard {shard.index}/{shard.count} needs --seed: the shards of one run share its "
                             "seed (or resume a run whose manifest records it)")
        ids = {item.id for item in run.mine}
        done = verified(folder, [r for r in records if r.line.get("id") in ids])
        in_the_way = []
        for item in run.mine:
            keys = [(item.id, k) for k in range(1, len(item.targets) + 1)]
            made = [key in done and matches(done[key].line, item, target) for key, target in zip(keys, item.targets)]
            if all(made):
                continue
            run.todo.append(item)
            for (_, k), listed in zip(keys, made):
                path = output_path(folder, item.id, k)
                if path.is_dir():
                    raise InputError(f"output {path} is a folder")
                if path.exists():
                    run.replace.add(item.id)
                    if not (overwrite or listed or run.ours(path, item)):
                        in_the_way.append(path)
        if in_the_way:
            more = f" (and {len(in_the_way) - 1} more)" if len(in_the_way) > 1 else ""
            raise InputError(f"output exists: {in_the_way[0]}{more}; neither the manifests of {folder} nor its "
                             "metadata say that this run made it: remove it, or pass --overwrite to start the run "
                             "over")
        return run

    def check_settings(self, records: list[Record]) -> int | None:
        """Refuse manifests of other settings, naming the first that differs in the order of self.settings (efddpm
        batch: the model, device type, dtype, then --method and the other flags); the run seed: --seed, else the one
        they record (None: none)."""
        seeds = {r.line["settings"].get("seed") for r in records}
        for record in records:
            recorded = record.line["settings"]
            for key in [*self.settings, *sorted(recorded.keys() - self.settings.keys())]:
                if key == "seed" and self.seed is None:
                    continue
                now = self.seed if key == "seed" else self.settings.get(key)
                if recorded.get(key) != now:
                    raise InputError(f"{record.file} was written with other settings (--{key.replace('_', '-')} "
                                     f"{recorded.get(key)!r}, now {now!r}); rerun with its settings to resume, or "
                                     "pass --overwrite to start over")
        if self.seed is None and len(seeds) > 1:
            raise InputError(f"the manifests of {self.folder} record several run seeds ({sorted(seeds, key=str)}); "
                             "pass --seed, or --overwrite to start over")
        return self.seed if self.seed is not None or not seeds else seeds.pop()

    def ours(self, path: Path, item: DatasetItem) -> bool:
        """Whether a file in the way is this run's own output of this item (its PNG metadata says so): the one
        in flight when a process was killed after placing it, before appending its line."""
        try:
            with Image.open(path) as img:
                meta = json.loads(getattr(img, "text", {}).get("efddpm", "null"))
        except (OSError, ValueError, SyntaxError):
            return False
        return isinstance(meta, dict) and meta.get("item_id") == item.id and \
            meta.get("run") == {**self.settings, "seed": self.seed}

    @property
    def outputs_todo(self) -> int:
        return sum(len(item.targets) for item in self.todo)

    def run(self, group: Group, make: Callable, batches: Callable, quiet: bool) -> int:
        """Do the items to do, in the batches that batches(todo) forms: make(items, item_seeds) -> for each item a
        PNG writer per target (efddpm.app.images.png_writer), or the InputError that stopped it; each item's PNGs
        written all or nothing as output_path(id, k), then their lines. A failed item is recorded and the run goes
        on. Returns the exit status: 1 when an item failed, else 0."""
        started = time.perf_counter()
        self.seed = group.agree(self.seed if self.seed is not None else secrets.randbelow(2**31))
        settings = {**self.settings, "seed": self.seed}
        shard = None if self.shard.count == 1 else f"{self.shard.index}/{self.shard.count}"
        if self.overwrite:   # start over: remove this process's part, the merge, and parts of other shard counts
            for path in manifest_files(self.folder):
                if path.name in (MANIFEST, self.shard.manifest) or f"-of-{self.shard.count}." not in path.name:
                    path.unlink(missing_ok=True)
        self.remove_temporaries()
        book, failed, finished = Appender(self.folder / self.shard.manifest), 0, 0
        try:
            book.append({"kind": "run", "settings": settings, "shard": shard, "efddpm_version": VERSION})
            note(quiet, (f"shard {shard}: {len(self.mine)} of {len(self.items)} items" if shard else
                         f"{len(self.items)} items") + f", {len(self.mine) - len(self.todo)} done earlier, "
                 f"{len(self.todo)} to do (run seed {self.seed})")
            with progress(self.outputs_todo, quiet, shard) as bar:
                for items in batches(self.todo):
                    for item, error in zip(items, self.do(items, settings, make, book)):
                        if error is not None:
                            bar.write(f"efddpm: {item.entry or item.id} failed: {error}", file=sys.stderr)
                        failed, finished = failed + (error is not None), finished + (error is None)
                    bar.update(sum(len(item.targets) for item in items))
            if self.shard.count > 1:
                book.append({"kind": "summary", "settings": settings, "shard": shard, "items": len(self.mine),
                             "done": len(self.mine) - failed, "failed": failed, "missing": 0,
                             "outputs": sum(len(item.targets) for item in self.mine),
                             "seconds": round(time.perf_counter() - started, 3)})
        except KeyboardInterrupt:
            raise KeyboardInterrupt(self.kept(finished)) from None
        except (MemoryError, torch.OutOfMemoryError) as e:
            raise out_of_memory(e, self.kept(finished)) from None
        except OutputError as e:
            raise OutputError(f"{e}; {self.kept(finished)}") from None
        finally:
            book.close()
        group.barrier()
        if not self.shard.merges:
            if failed:
                print(f"efddpm: {failed} of {len(self.mine)} items of shard {shard} failed; see "
                      f"{self.folder / self.shard.manifest}, and rerun the same command to retry them", file=sys.stderr)
            return 1 if failed else 0
        summary = merge(self.folder, [(item.id, len(item.targets)) for item in self.items], settings,
                        {"kind": "run", "settings": settings, "shard": None, "efddpm_version": VERSION},
                        {"shard": None, "seconds": round(time.perf_counter() - started, 3)})
        if summary["failed"] or summary["missing"]:
            print(f"efddpm: {summary['failed']} of {summary['items']} items failed"
                  + (f", {summary['missing']} were not done" if summary["missing"] else "")
                  + f"; see {self.folder / MANIFEST}, and rerun the same command to retry them", file=sys.stderr)
            return 1
        note(quiet, f"{summary['done']} of {summary['items']} items done, {summary['outputs']} outputs; see "
                    f"{self.folder / MANIFEST}")
        return 0

    def kept(self, finished: int) -> str:
        """What an interrupted run says it kept."""
        return (f"{len(self.mine) - len(self.todo) + finished} of {len(self.mine)} entries were finished and written "
                f"(listed in {self.folder / self.shard.manifest}); rerun the same command to do the rest")

    def do(self, items: list[DatasetItem], settings: dict, make: Callable, book: Appender) -> list[str | None]:
        """One batch: each item's PNGs in place, then their lines; its error (recorded) or None, item by item.
        "seconds" is the item's share of the batch's time; "batch" the number of items made together."""
        started, seeds = time.perf_counter(), [item_seed(self.seed, item.id) for item in items]
        try:
            made = make(items, seeds)
        except InputError as e:          # the batch as a whole: every item of it fails with the same error
            made = [e] * len(items)
        seconds = round((time.perf_counter() - started) / len(items), 3)
        errors = []
        for item, seed, result in zip(items, seeds, made, strict=True):
            common = {"item_seed": seed, "seconds": seconds, "batch": len(items), "settings": settings}
            if isinstance(result, InputError):
                book.append({"kind": "failed", "id": item.id, **inputs(item), "error": str(result), **common})
                errors.append(str(result))
                continue
            paths = [output_path(self.folder, item.id, k) for k in range(1, len(item.targets) + 1)]
            with Outputs(overwrite=self.overwrite or item.id in self.replace) as staged:
                for path, writer in zip(paths, result, strict=True):
                    staged.write(path, writer)
            book.append(*({"kind": "output", "id": item.id, "k": k, **inputs(item, target), "output": path.name,
                           "sha256": sha256(path), **common}
                          for k, (path, target) in enumerate(zip(paths, item.targets), 1)))
            errors.append(None)
        return errors

    def remove_temporaries(self) -> None:
        """What a killed process left of the outputs to do: efddpm.core.atomic's temporary files .NAME.*.tmp and
        the old files it keeps while replacing, .NAME.*.replaced (ids hold no glob characters)."""
        for item in self.todo:
            for k in range(1, len(item.targets) + 1):
                for leftover in self.folder.glob(f".{output_path(self.folder, item.id, k).name}.*"):
                    if leftover.suffix in (".tmp", ".replaced"):
                        leftover.unlink(missing_ok=True)


def note(quiet: bool, text: str) -> None:
    if not quiet:
        print(f"efddpm: {text}", file=sys.stderr)


class NoBar:
    """What progress() returns when quiet: a context whose update does nothing (tqdm is not even created, so a
    notebook without ipywidgets gets no warning about it)."""

    def __enter__(self) -> "NoBar":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def write(self, text: str, file=sys.stderr) -> None:
        print(text, file=file)


def progress(total: int, quiet: bool, shard: str | None):
    """The run's progress bar over its edits (edits/s and the time left), on stderr; none when quiet."""
    if quiet or not total:
        return NoBar()
    from huggingface_hub.utils import tqdm
    return tqdm(total=total, unit="edit", file=sys.stderr, leave=False, desc=f"shard {shard}" if shard else None)
