"""Every cross-reference in the package's docstrings (``:func:``, ``:class:``, ``:mod:``, ...) names something that
exists: a reader who follows one lands on it (after the predictor's files moved into its stages, several did not)."""

import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_memopt"
REFERENCE = re.compile(r":(?:mod|func|class|data|meth|attr):`~?(\.?[\w.]+)`")


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        try:
            for attribute in parts[k:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return False
        return True
    return False


def _references(path: Path) -> "list[str]":
    """The package's own references in ``path``, relative ones made absolute from its package."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = ".".join(rel[:-1])
    found = []
    for match in REFERENCE.finditer(path.read_text()):
        ref = match.group(1)
        name = package + ref if ref.startswith(".") else ref
        if name.startswith("lightning_memopt"):
            found.append(name)
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_every_reference_names_something_that_exists(path):
    missing = sorted({name for name in _references(path) if not _resolves(name)})
    assert not missing, f"{path.name} refers to what does not exist: {missing}"


def test_a_reference_to_a_moved_module_is_caught(monkeypatch):
    probe = PACKAGE / "predictor" / "api.py"
    monkeypatch.setattr(Path, "read_text", lambda self: ":func:`~lightning_memopt.predictor.timeline.step_timeline`")
    with pytest.raises(AssertionError, match="predictor.timeline.step_timeline"):
        test_every_reference_names_something_that_exists(probe)
