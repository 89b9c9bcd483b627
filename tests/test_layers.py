"""The package's one-way layers, read from the source: every ``import`` (module level and inside functions) of every
module, checked against the layer map of ``docs/architecture.md``."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_memopt"

#: module prefix -> layer; a module may import its own package and the packages of lower layers only. The longest
#: matching prefix wins.
LAYERS = {
    "lightning_memopt._imports": 0,
    "lightning_memopt.core": 1,
    "lightning_memopt.measuring": 2,
    "lightning_memopt.predictor": 2,
    "lightning_memopt.transforms": 2,
    "lightning_memopt.planning": 3,
    "lightning_memopt.lightning": 4,  # the run reader, the private-API module, checkpoint consolidation
    "lightning_memopt.lightning.strategies": 5,
    "lightning_memopt.lightning.callbacks": 6,
    "lightning_memopt.lightning._registration": 7,  # registers the strategy names when Lightning loads
    "lightning_memopt.cli": 7,
    "lightning_memopt.callbacks": 7,  # public aliases of moved names
    "lightning_memopt.strategies": 7,
    "lightning_memopt.utilities": 7,
    "lightning_memopt": 8,  # the lazy package root
}
LIGHTNING_LAYER = "lightning_memopt.lightning"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> "list[str]":
    """Every module ``path`` imports, anywhere in it (``from a import b`` counts as ``a.b`` when ``b`` is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *filter(None, [base])])
            modules = [f"{base}.{alias.name}" for alias in node.names if _is_module(f"{base}.{alias.name}")]
            found += modules if len(modules) == len(node.names) else [base, *modules]
    return found


def _is_module(name: str) -> bool:
    if not name.startswith("lightning_memopt"):
        return False
    rel = PACKAGE.parent.joinpath(*name.split("."))
    return rel.with_suffix(".py").is_file() or (rel / "__init__.py").is_file()


def _layer(name: str) -> "tuple[str, int]":
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return prefix, LAYERS[prefix]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_layer_map_covers_every_package():
    packages = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert packages <= set(LAYERS), packages - set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_go_down_the_layers_only(path):
    name = _module_name(path)
    own, rank = _layer(name)
    wrong = []
    for target in _imports(path):
        if not target.startswith("lightning_memopt"):
            continue
        theirs, their_rank = _layer(target)
        if theirs != own and their_rank >= rank:
            wrong.append(f"{target} (layer {their_rank}, {theirs})")
    assert not wrong, f"{name} (layer {rank}) imports upward or sideways: {wrong}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_only_the_lightning_layer_imports_lightning(path):
    name = _module_name(path)
    lightning = [t for t in _imports(path) if t.split(".")[0] in ("lightning", "pytorch_lightning")]
    if not name.startswith(LIGHTNING_LAYER):
        assert not lightning, f"{name} imports {lightning}; only {LIGHTNING_LAYER} may import Lightning"


def test_no_import_cycle_between_packages():
    edges: "dict[str, set[str]]" = {}
    for path in MODULES:
        own = _layer(_module_name(path))[0]
        for target in _imports(path):
            if target.startswith("lightning_memopt") and _layer(target)[0] != own:
                edges.setdefault(own, set()).add(_layer(target)[0])

    def reaches(start: str, goal: str, seen: "set[str]") -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges.get(start, ()))

    cycles = sorted(f"{a} <-> {b}" for a, targets in edges.items() for b in targets if reaches(b, a, {b}))
    assert not cycles, cycles


def test_the_import_reader_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The walk is not fooled by a function-local import (a hidden cycle is still a cycle)."""
    source = "def f():\n    from lightning_memopt.cli import estimate\n    import lightning.pytorch\n"
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    assert {"lightning_memopt.cli", "lightning.pytorch"} <= set(_imports(probe))
