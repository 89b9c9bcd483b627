"""Griffe extension for the API pages: read a Google docstring's ``Example:`` section as ``Examples:``.

The package's docstrings head their doctests with ``Example:``; griffe's Google parser only knows ``Examples:``
and would render the doctest as text (where ``x["a"]["b"]`` reads as a Markdown link). Used by mkdocs.yml.
"""

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section headers to ``Examples:`` in every loaded docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
