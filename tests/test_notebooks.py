"""The teaching notebooks (notebooks/*.ipynb): they run from a clean kernel without error, use only efddpm's
public API, open with what they teach and end with what the reader should have seen, and are committed with
their outputs.

Execution needs the test-only dependencies nbformat, nbclient, ipykernel and matplotlib (the `test` extra);
without them those tests are skipped, saying so. Notebooks 2-5 need the embedded default model
(efddpm.app.embedded.DEFAULT_MODEL, committed under weights/): without it they fail, naming the missing file.
"""
import ast
import json
import os
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds; the six notebooks together take about five minutes on a 2-core CPU (02 and 05 about 80 s each)


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def code_of(path: Path) -> list[str]:
    """The source of each code cell, IPython magics and shell lines blanked (so that ast can parse it)."""
    out = []
    for c in cells(path):
        if c["cell_type"] == "code":
            src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            out.append("\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in src.splitlines()))
    return out


def private_uses(source: str) -> list[str]:
    """Private names of efddpm that `source` imports or touches: `from efddpm.x import _y`, `import efddpm._x`,
    and any `name._private` attribute access at all."""
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "efddpm":
            if any(part.startswith("_") for part in node.module.split(".")):
                found.append(f"from {node.module} import ...")
            found += [f"from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "efddpm" and any(p.startswith("_") for p in a.name.split("."))]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"{ast.unparse(node)} (a private attribute)")
    found += [m.group(0) for m in re.finditer(r"efddpm(?:\.\w+)*\._[A-Za-z]\w*", source)]
    return found


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5, f"expected the five teaching notebooks in {ROOT / 'notebooks'}, found {NOTEBOOKS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_public_api_only(path):
    bad = [use for src in code_of(path) for use in private_uses(src)]
    assert not bad, f"{path.name} uses private names: {bad}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_opens_with_what_it_teaches_and_ends_with_what_was_seen(path):
    cs = cells(path)
    first, last = ("".join(cs[0]["source"]), "".join(cs[-1]["source"]))
    assert cs[0]["cell_type"] == "markdown" and "What this notebook teaches" in first, path.name
    assert cs[-1]["cell_type"] == "markdown" and "What you should have seen" in last, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_with_outputs(path):
    code = [c for c in cells(path) if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code), f"{path.name}: commit it executed (every cell run)"
    assert any("image/png" in o.get("data", {}) for c in code for o in c["outputs"]), f"{path.name}: no figure"
    assert not any(o["output_type"] == "error" for c in code for o in c["outputs"]), f"{path.name}: has an error"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_executes_from_a_clean_state(path, monkeypatch):
    for module in ("nbformat", "nbclient", "ipykernel", "matplotlib"):
        pytest.importorskip(module, reason=f"executing the notebooks needs {module} (pip install -e '.[test]')")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    for c in nb.cells:  # a clean state: no outputs, no execution counts
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    # the kernel imports the checkout under test, whatever else is installed (as pytest's pythonpath does)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    start = time.perf_counter()
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()  # raises on any cell's error
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
