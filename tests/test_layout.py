"""The package layout is the architecture: each layer imports only the layers below it, no module imports a private
name of another, and no file grows past ~400 lines. Read from the source with `ast`, nothing is imported."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "efddpm"
# bottom to top; a module may import its own layer and the ones before it
LAYERS = ["core", "nets", "method", "checkpoint", "app", "eval", "miniature"]
MAX_LINES = 420


def modules() -> dict[str, Path]:
    """{"efddpm.method.inversion": path} for every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, [imported names]) for each import of efddpm in the file; relative imports are resolved."""
    tree, out = ast.parse(path.read_text(encoding="utf-8")), []
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names if alias.name.startswith("efddpm")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if module.startswith("efddpm"):
                out.append((module, [alias.name for alias in node.names]))
    return out


def layer(module: str) -> int | None:
    """The layer of efddpm.<layer>...; None for the package facade (efddpm, efddpm.__main__)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_belongs_to_a_layer():
    strays = [m for m in modules() if layer(m) is None and m not in ("efddpm", "efddpm.__main__")]
    assert strays == [], f"modules outside the layers {LAYERS}: {strays}"


def test_layers_import_only_downwards():
    upward = []
    for module, path in modules().items():
        own = layer(module)
        if own is None:              # the facade re-exports from every layer
            continue
        for target, _ in imports(path):
            other = layer(target)
            if other is None or other > own:
                upward.append(f"{module} imports {target}")
    assert upward == [], "\n".join(upward)


def test_no_private_name_is_imported_across_modules():
    private = [f"{module} imports {name} from {target}" for module, path in modules().items()
               for target, names in imports(path) for name in names if name.startswith("_") and target != module]
    assert private == [], "\n".join(private)


def test_no_file_is_longer_than_about_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, long
