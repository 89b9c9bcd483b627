"""``lightning-memopt presets``: the built-in model catalog (name, Hub id, kind, published size)."""

import argparse
from typing import Any

__all__ = ["add_parser", "run_presets"]


def add_parser(subparsers: Any) -> None:
    """Register the ``presets`` subcommand."""
    parser = subparsers.add_parser(
        "presets",
        help="list the built-in models (complete Hugging Face configs; use the name as MODEL)",
        description="List the presets: each is the published config.json of a Hugging Face model, usable as MODEL"
        " in `estimate`, `plan` and `plot` without downloading anything.",
    )
    parser.add_argument("--kind", choices=("dense", "moe", "encoder", "vision", "multimodal"), default=None,
                        help="only this kind")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=run_presets)


def run_presets(args: argparse.Namespace) -> int:
    """Print the catalog as a table (or JSON)."""
    from lightning_memopt.cli.estimate import print_json
    from lightning_memopt.predictor.read.presets import CATALOG, PRESETS

    rows = [
        {
            "name": p.name,
            "hub_id": p.hub_id,
            "kind": p.kind,
            "size": p.size,
            "model_type": PRESETS[p.name]["model_type"],
        }
        for p in CATALOG
        if args.kind is None or p.kind == args.kind
    ]
    if args.json:
        print_json(rows)
        return 0
    columns = ("name", "size", "kind", "model_type", "hub_id")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns).rstrip())
    print("-+-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(row[c].ljust(widths[c]) for c in columns).rstrip())
    return 0
