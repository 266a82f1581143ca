"""Writing files all or nothing: the one writer behind checkpoints, latent codes and PNGs.

    with Outputs(overwrite=False) as out:
        out.write("edits/cat_1.png", lambda tmp: img.save(tmp, format="PNG"))
        out.write("edits/cat_2.png", ...)
    # here both files are in place, or (on any exception, inside or while moving them) neither is

Each file is first written to a temporary file beside its final name (same folder, so moving it is a rename).
Only when every file is written are they moved into place. Without `overwrite` a file is placed by exclusive
creation (a hard link, which fails if the name exists): two runs writing the same name never silently replace
each other, the second one fails. With `overwrite` an existing file is set aside first and put back if a later
move fails. Files get the mode the umask gives (0666 & ~umask), like any other tool's output.
"""
from __future__ import annotations

import errno
import os
import tempfile
import uuid
from pathlib import Path
from typing import Callable


class OutputError(OSError):
    """An output that cannot be written (exists, is a folder, disk full, ...); the message is one line."""


def file_mode() -> int:
    """0666 less the process umask: the mode open() would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class Outputs:
    def __init__(self, overwrite: bool = False):
        self.overwrite = overwrite
        self.staged: list[tuple[Path, Path]] = []   # (temporary file, final path)

    def check(self, path: str | os.PathLike) -> Path:
        """Refuse, before any work, a name that is a folder, or that exists when not overwriting."""
        path = Path(path)
        if path.is_dir():
            raise OutputError(f"output {path} is a folder")
        if path.exists() and not self.overwrite:
            raise OutputError(f"output exists: {path}; pass --overwrite to replace it")
        return path

    def write(self, path: str | os.PathLike, write: Callable[[Path], None]) -> None:
        """write(tmp) fills a temporary file beside `path`; commit() moves it into place."""
        path = self.check(path)
        if any(final == path for _, final in self.staged):
            raise OutputError(f"output {path} is written twice by one command")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            self.staged.append((Path(tmp), path))
            write(Path(tmp))
            os.chmod(tmp, file_mode())
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None

    def commit(self) -> list[Path]:
        """Move every staged file into place, or none of them; returns the final paths.

        Without overwrite a file is placed by a hard link, which fails on an existing name. With overwrite the old
        file is first kept under a second name (a hard link: the final name never disappears), then replaced in
        one rename; if a later file fails, the old ones are put back."""
        placed, kept = [], []   # final paths placed so far; (backup, final) of the files replaced
        try:
            for tmp, path in self.staged:
                if self.overwrite and path.exists():
                    if path.is_dir():
                        raise OutputError(f"output {path} is a folder")
                    backup = path.with_name(f".{path.name}.{uuid.uuid4().hex}.replaced")
                    os.link(path, backup)
                    kept.append((backup, path))
                    os.replace(tmp, path)
                else:
                    place_new(tmp, path)
                placed.append(path)
        except BaseException as e:
            restored = {path for _, path in kept}
            for path in placed:
                if path not in restored:
                    best_effort(path.unlink, missing_ok=True)
            for backup, path in kept:
                best_effort(os.replace, backup, path)
            self.discard()
            if isinstance(e, FileExistsError):
                raise OutputError(f"output exists: {e.filename}; another run wrote it meanwhile") from None
            if isinstance(e, OSError) and not isinstance(e, OutputError):
                raise OutputError(f"cannot write {e.filename or path}: {e.strerror or e}") from None
            raise
        for backup, _ in kept:
            best_effort(backup.unlink, missing_ok=True)
        self.staged = []
        return placed

    def discard(self) -> None:
        """Remove the temporary files not moved into place."""
        for tmp, _ in self.staged:
            tmp.unlink(missing_ok=True)
        self.staged = []

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def place_new(tmp: Path, path: Path) -> None:
    """Move tmp to path, never replacing a file that exists (a hard link fails on an existing name)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():   # a file system without hard links: check, then rename (not race-free)
            raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def best_effort(action, *args, **kwargs) -> None:
    """Undo steps run to the end even when one of them fails: the others still undo what they can."""
    try:
        action(*args, **kwargs)
    except OSError:
        pass


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = True) -> None:
    """One file, all or nothing: write(tmp) fills a temporary file, then it is moved to `path`."""
    with Outputs(overwrite=overwrite) as out:
        out.write(path, write)
