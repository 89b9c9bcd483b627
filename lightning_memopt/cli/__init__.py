"""The ``lightning-memopt`` command line: ``estimate``, ``plan``, ``plot``, ``presets``, ``consolidate``.

Each subcommand module exposes ``add_parser(subparsers)``, which adds its parser(s) and sets
``handler=<function(args) -> int>`` with ``set_defaults``. To add one, append its module to
:data:`SUBCOMMAND_MODULES`.

Exit codes: 0 success; 1 the question has no answer (e.g. nothing fits); 2 bad input (a one-line message on
stderr, no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["SUBCOMMAND_MODULES", "CliError", "build_parser", "main"]

#: Modules whose ``add_parser(subparsers)`` registers subcommands, in help order.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "lightning_memopt.cli.estimate",
    "lightning_memopt.cli.plot",
    "lightning_memopt.cli.presets",
    "lightning_memopt.cli.consolidate",
)


class CliError(Exception):
    """Bad command-line input; ``main`` prints it on one line and exits 2."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage dump) and do not exit the interpreter."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand.

    Example:
        >>> build_parser().parse_args(["plan", "8B", "--gpu-memory", "80GiB", "--seq-len", "4096",
        ...                            "--global-batch-tokens", "4M"]).global_batch_tokens
        4000000
    """
    parser = _Parser(prog="lightning-memopt", description="Predict and plan per-rank training memory.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a subcommand that is not written yet
            if err.name != name:
                raise
            continue
        module.add_parser(subparsers)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Example:
        >>> main(["estimate", "8B", "--zero", "9"])  # bad input: one line on stderr, exit code 2
        2
    """
    try:
        args = build_parser().parse_args(argv)
        return int(args.handler(args))
    except CliError as err:
        print(_one_line(err), file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, KeyError, ModuleNotFoundError) as err:
        print(f"lightning-memopt: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help / --version
        return exit_.code if isinstance(exit_.code, int) else 0
