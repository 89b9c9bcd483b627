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
#: the predictor's pipeline (``docs/architecture.md``): module prefix -> stage. A module may import its own stage and
#: earlier ones only; the root modules (the request, the device, the precision) are stage 0, read by every stage,
#: and ``api`` runs the four stages in order.
STAGES = {
    "lightning_memopt.predictor": 0,
    "lightning_memopt.predictor.read": 1,
    "lightning_memopt.predictor.trace": 2,
    "lightning_memopt.predictor.account": 3,
    "lightning_memopt.predictor.report": 4,
    "lightning_memopt.predictor.api": 5,
}


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
    assert packages <= set(LAYERS) | set(STAGES), packages - set(LAYERS) - set(STAGES)


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


def _stage(name: str) -> "tuple[str, int]":
    prefix = max((p for p in STAGES if name == p or name.startswith(p + ".")), key=len)
    return prefix, STAGES[prefix]


PREDICTOR = [p for p in MODULES if _module_name(p).startswith("lightning_memopt.predictor")]


@pytest.mark.parametrize("path", PREDICTOR, ids=lambda p: _module_name(p))
def test_the_predictor_stages_import_their_own_and_earlier_stages_only(path):
    """read -> trace -> account -> report: a stage takes the previous stage's object and never reaches back into a
    later one (the root's request, device and precision are read by all)."""
    name = _module_name(path)
    own, rank = _stage(name)
    wrong = []
    for target in _imports(path):
        if target.startswith("lightning_memopt.predictor"):
            theirs, their_rank = _stage(target)
            if their_rank > rank or (their_rank == rank and theirs != own):
                wrong.append(f"{target} (stage {their_rank}, {theirs})")
    assert not wrong, f"{name} (stage {rank}) imports a later stage: {wrong}"


def test_the_stage_reader_sees_a_later_stage(tmp_path, monkeypatch):
    """The stage check fails on a trace module that imports the accounting (a stage reaching forward)."""
    (tmp_path / "lightning_memopt" / "predictor" / "trace").mkdir(parents=True)
    probe = tmp_path / "lightning_memopt" / "predictor" / "trace" / "probe.py"
    probe.write_text("from lightning_memopt.predictor.account.accounting import account\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "lightning_memopt")
    with pytest.raises(AssertionError, match="imports a later stage"):
        test_the_predictor_stages_import_their_own_and_earlier_stages_only(probe)


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
