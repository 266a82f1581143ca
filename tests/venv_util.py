"""A fresh virtual environment for install tests that sees the packages of the interpreter running pytest.

`python -m venv --system-site-packages` would not do: run from a virtualenv (as the README suggests), the
"system" packages are the base interpreter's, without torch, huggingface_hub and the rest installed in that
virtualenv. Instead the new venv gets a .pth file listing the running interpreter's site-packages folders:
its dependencies resolve while sys.prefix (where pip installs) is the new venv.
"""
import site
import subprocess
import sys
import sysconfig
from pathlib import Path


def running_site_dirs() -> list[str]:
    """The site-packages folders of the running interpreter: a venv's own (plus the base's when it includes
    them), or the system's; then the user's, when enabled."""
    dirs = [*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return list(dict.fromkeys(d for d in dirs if Path(d).is_dir()))


def fresh_venv(path: Path) -> Path:
    """Create a venv at `path` that imports what the running interpreter imports; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True, timeout=300)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    # plain path lines: appended after the venv's own site-packages, so what is installed there comes first
    (Path(purelib) / "running-interpreter.pth").write_text("".join(d + "\n" for d in running_site_dirs()))
    return python
