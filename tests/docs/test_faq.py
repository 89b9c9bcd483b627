"""docs/faq.md lists every error message of the package (regenerate with ``python docs/scripts/gen_faq.py``)."""

import importlib.util

from helpers import ROOT


def _generator():
    spec = importlib.util.spec_from_file_location("gen_faq", ROOT / "docs" / "scripts" / "gen_faq.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_faq_is_up_to_date_with_the_source():
    gen = _generator()
    assert (ROOT / "docs" / "faq.md").read_text() == gen.build(), "run: python docs/scripts/gen_faq.py"


def test_every_message_has_a_fix():
    gen = _generator()
    found = [m for path in gen.PACKAGE.rglob("*.py") for _, m in gen.messages(path)]
    assert len(found) > 100
    assert all(gen.fix_of(m) != "See the message." for m in found)
