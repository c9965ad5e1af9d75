"""The package's layers (docs/design.md): a module imports only from its own folder and the layers below it, so each
folder can be read, tested and replaced knowing only what lies under it."""
import ast
from pathlib import Path

import qtune

PACKAGE = Path(qtune.__file__).parent
# Lowest first. Each top-level module or folder of src/qtune is one layer.
LAYERS = ["__init__", "errors", "io", "options", "precision", "preprocessing", "data", "backbones", "methods", "tuned",
          "cache", "memory", "engine", "experiments", "report", "pretrain", "demo", "cli"]


def _top_level() -> set[str]:
    """The package's modules and folders of modules (``engine`` has no ``__init__``)."""
    return {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
            if p.suffix == ".py" or (p.is_dir() and any(p.glob("*.py")))}


def _layer(parts: tuple[str, ...]) -> str:
    """A module's layer; a name imported from the package itself (``from . import __version__``) is its root's."""
    return parts[0] if parts and parts[0] in _top_level() else "__init__"


def _imports(path: Path) -> list[tuple[str, ...]]:
    """The qtune modules ``path`` imports (function-level imports too), as parts below ``qtune``."""
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    package = rel[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            if node.module:
                out.append((*base, *node.module.split(".")))
            else:
                out += [(*base, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qtune"):
            out.append(tuple(node.module.split(".")[1:]))
        elif isinstance(node, ast.Import):
            out += [tuple(a.name.split(".")[1:]) for a in node.names if a.name.startswith("qtune.")]
    return out


def test_every_top_level_module_has_a_layer():
    assert _top_level() == set(LAYERS)


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        mine = _layer(path.relative_to(PACKAGE).with_suffix("").parts)
        for target in _imports(path):
            theirs = _layer(target)
            if LAYERS.index(theirs) > LAYERS.index(mine):
                upward.append(f"{path.relative_to(PACKAGE)} imports {'.'.join(target)}")
    assert not upward, upward
