"""The repository stands alone: a fresh clone holds everything its files cite, and its install tests run
from a virtualenv as well as from a system install."""
import re
import subprocess
from pathlib import Path

import pytest

from venv_util import fresh_venv

ROOT = Path(__file__).resolve().parents[1]
# Things outside the repository: the sibling folders of a larger workspace and its spec file, by name or by its
# numbered list of rules. Written so that this file does not match itself.
OUTSIDE = re.compile(r"\.\./shared|shared/(?:fixtures|anchors)|\bSPEC\b|[Pp]itfalls? \d")


def repository_files() -> list[Path]:
    """Tracked files, and new files not ignored by .gitignore (what the next commit can hold)."""
    r = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                       capture_output=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"not a git checkout: {r.stderr.decode(errors='replace').strip()}")
    return [ROOT / name for name in r.stdout.decode().split("\0") if name and (ROOT / name).is_file()]


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte in its first 8 KiB, or not UTF-8)."""
    with open(path, "rb") as f:
        if b"\0" in f.read(8192):
            return None
        f.seek(0)
        try:
            return f.read().decode("utf-8")
        except UnicodeDecodeError:
            return None


def test_no_file_cites_anything_outside_the_repository():
    hits = []
    for path in repository_files():
        text = text_of(path)
        for n, line in enumerate((text or "").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, "cites what a fresh clone does not have (write the rule out instead):\n" + "\n".join(hits)


def test_the_fixtures_are_in_the_repository():
    from models_util import FIXTURES
    assert FIXTURES.is_relative_to(ROOT)
    for name in ("UNET-v1-SD.txt", "UNET-v1-EMA.txt", "VAE-v1-SD.txt", "CLIP-v1-SD.txt", "README.md"):
        assert (FIXTURES / name).is_file(), name
    assert "MIT" in (FIXTURES / "README.md").read_text()  # the licence note travels with the lists


def test_a_fresh_venv_runs_efddpm_with_the_running_interpreters_packages(tmp_path):
    """Install tests build a venv and install into it; from a virtualenv, --system-site-packages would give
    the base interpreter's packages, without efddpm's dependencies."""
    python = fresh_venv(tmp_path / "venv")
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import efddpm; print(sys.prefix)"
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == tmp_path / "venv"
