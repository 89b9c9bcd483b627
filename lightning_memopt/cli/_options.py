"""Which command-line options apply to which others: an option given where it has no effect is an error.

Options whose use depends on others are declared with ``default=None`` (``store_true`` flags: ``False``), so that
"given" means "not None / not False"; their real defaults are filled in after the check (:func:`fill_defaults`).
Each command keeps a tuple of :class:`Applies` rules; one rule per option that does not always apply.

Example:
    >>> import argparse
    >>> rules = (Applies("--inference", "inference", lambda a: a.quantization is not None, "with --quantization"),)
    >>> check_applicable(argparse.Namespace(inference=True, quantization="q8_0"), rules)
    >>> check_applicable(argparse.Namespace(inference=True, quantization=None), rules)
    Traceback (most recent call last):
    ...
    ValueError: Expected --inference only with --quantization, got --inference where it has no effect. Fix: drop \
--inference, or change the other options so that it applies.
"""

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Applies", "check_applicable", "fill_defaults", "given"]


@dataclass(frozen=True)
class Applies:
    """``option`` (stored in ``dest``) has an effect only when ``when(args)`` holds; ``needs`` says when in words.

    Attributes:
        option: the flag as the user types it, e.g. ``"--lora-rank"``.
        dest: the ``argparse`` destination, e.g. ``"lora_rank"``.
        when: predicate over the parsed arguments (defaults not filled in yet: ``None`` means not given).
        needs: the condition in words, completing "Expected OPTION only ...", e.g. ``"with --quantization"``.
        fix: what else fixes it besides dropping the option; default: change the other options so that it applies.
    """

    option: str
    dest: str
    when: "Callable[[argparse.Namespace], bool]"
    needs: str
    fix: "str | None" = None


def given(args: argparse.Namespace, dest: str) -> bool:
    """Whether the user gave the option stored in ``dest`` (its value is neither ``None`` nor ``False``)."""
    value = getattr(args, dest, None)
    return value is not None and value is not False


def check_applicable(args: argparse.Namespace, rules: "tuple[Applies, ...]") -> None:
    """Raise ``ValueError`` for the first option given whose rule does not hold."""
    for rule in rules:
        if given(args, rule.dest) and not rule.when(args):
            other = rule.fix or "change the other options so that it applies"
            raise ValueError(
                f"Expected {rule.option} only {rule.needs}, got {rule.option} where it has no effect."
                f" Fix: drop {rule.option}, or {other}."
            )


def fill_defaults(args: argparse.Namespace, defaults: "dict[str, Any]") -> argparse.Namespace:
    """Set each ``dest`` that was not given (``None``) to its default; returns ``args``."""
    for dest, value in defaults.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, value)
    return args
