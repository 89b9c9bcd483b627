"""``lightning-memopt plot``: the lecture's central picture for one model.

Per-rank memory by category (parameters, gradients, optimizer states, activations, logits, buffers) against the
micro-batch, one panel per ZeRO stage and activation-checkpointing setting, with the device line: model states
are flat and shrink with the ZeRO stage; activations and logits grow with the tokens and shrink with checkpointing.

    lightning-memopt plot llama-3-8b --gpus 8 --seq-len 4096 --gpu-memory 80GiB --out memory.png
"""

import argparse
from typing import Any

from lightning_memopt.cli._options import Applies
from lightning_memopt.cli.estimate import (
    _bytes_arg,
    _positive_int,
    add_common,
    common_kwargs,
    parse_stages,
    prepare,
    print_json,
)
from lightning_memopt.core.units import format_bytes
from lightning_memopt.predictor.report.estimate import CATEGORIES

__all__ = ["PLOT_RULES", "add_parser", "memory_grid", "run_plot"]

_CHECKPOINTING = {"off": (False,), "on": (True,), "both": (False, True)}
#: with a device line, the y axis ends at this many devices; taller bars are labelled with their value
_CLIP = 2.5
PLOT_RULES: "tuple[Applies, ...]" = (
    Applies("--zero-stages", "zero_stages", lambda a: a.engine != "torch", "without --engine torch (plain Lightning"
            " has no ZeRO)"),
    Applies("--margin", "margin", lambda a: a.gpu_memory is not None, "with --gpu-memory (the budget line)"),
)


def _micro_batches(text: str) -> "tuple[int, ...]":
    try:
        values = tuple(sorted({_positive_int(v.strip()) for v in text.split(",") if v.strip()}))
    except argparse.ArgumentTypeError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected micro-batches like 1,2,4,8, got {text!r}. Fix: positive integers separated by commas"
        )
    return values


def add_parser(subparsers: Any) -> None:
    """Register the ``plot`` subcommand."""
    parser = subparsers.add_parser(
        "plot",
        help="per-rank memory by category vs micro-batch, per ZeRO stage and checkpointing (a PNG)",
        description="Draw the predicted per-rank memory by category against the micro-batch for each ZeRO stage"
        " and activation-checkpointing setting, with the device line.",
    )
    add_common(parser)
    parser.add_argument("--seq-len", type=_positive_int, required=True, help="tokens per sequence")
    parser.add_argument("--micro-batches", type=_micro_batches, default=(1, 2, 4, 8, 16),
                        help="micro-batches on the x axis (1,2,4,8,16)")  # fmt: skip
    parser.add_argument("--zero-stages", default=None, help="ZeRO stages, one column each (0,1,2,3)")
    parser.add_argument("--checkpointing", choices=tuple(_CHECKPOINTING), default="both",
                        help="activation checkpointing: off, on, or both (one row each; default both)")  # fmt: skip
    parser.add_argument("--gpu-memory", type=_bytes_arg, default=None, help="device memory, e.g. 80GiB (the line)")
    parser.add_argument("--out", default=None, help="the PNG to write, e.g. memory.png (needs matplotlib)")
    parser.set_defaults(handler=run_plot)


def memory_grid(
    model: Any,
    *,
    seq_len: int,
    micro_batches: "tuple[int, ...]",
    zero_stages: "tuple[int, ...]",
    checkpointing: "tuple[bool, ...]",
    **estimate_kwargs: Any,
) -> "list[dict[str, Any]]":
    """One row per (ZeRO stage, checkpointing, micro-batch): the predicted categories and total per rank, in bytes.

    Example:
        >>> rows = memory_grid("gpt2", seq_len=1024, micro_batches=(1, 8), zero_stages=(0, 3),
        ...                    checkpointing=(False,), world_size=8)
        >>> [(r["zero"], r["micro_batch_size"]) for r in rows]
        [(0, 1), (0, 8), (3, 1), (3, 8)]
        >>> rows[1]["activations"] > rows[0]["activations"]
        True
        >>> rows[2]["optimizer_states"] < rows[0]["optimizer_states"]
        True
    """
    from lightning_memopt.planning.estimate import estimate_memory

    rows = []
    for zero in zero_stages:
        for ckpt in checkpointing:
            for micro in micro_batches:
                est = estimate_memory(model, zero=zero, activation_checkpointing=ckpt, micro_batch_size=micro,
                                      seq_len=seq_len, **estimate_kwargs)  # fmt: skip
                rows.append({"zero": zero, "checkpointing": ckpt, "micro_batch_size": micro, "tokens": micro * seq_len,
                             **{c: getattr(est, c) for c in CATEGORIES}, "total": est.total})  # fmt: skip
    return rows


def _title(args: argparse.Namespace) -> str:
    engine = {"torch": "plain torch", "zero-paper": "ZeRO paper's accounting"}.get(args.engine, "DeepSpeed")
    return (f"{args.model}: predicted memory per rank ({args.gpus} GPU(s), {args.seq_len} tokens per sequence,"
            f" {args.precision}, {args.optimizer}, {engine})")  # fmt: skip


def figure(rows: "list[dict[str, Any]]", args: argparse.Namespace) -> Any:
    """The figure of :func:`memory_grid`'s rows: one panel per ZeRO stage (columns) and checkpointing (rows)."""
    from lightning_memopt.core.plotting import (
        CATEGORY_GROUPS,
        COLORS,
        draw_limits,
        group,
        legend_patches,
        pyplot,
        unit_for,
    )

    plt = pyplot("lightning-memopt plot --out")
    stages = sorted({r["zero"] for r in rows})
    ckpts = sorted({r["checkpointing"] for r in rows})
    micros = sorted({r["micro_batch_size"] for r in rows})
    top = max(r["total"] for r in rows)
    unit, scale = unit_for(max(top, args.gpu_memory or 0))
    budget = None if args.gpu_memory is None else args.gpu_memory * (1 - args.margin)
    fig, axes = plt.subplots(len(ckpts), len(stages), figsize=(2.9 * len(stages) + 1.2, 2.6 * len(ckpts) + 1.1),
                             sharey=True, squeeze=False)  # fmt: skip
    for i, ckpt in enumerate(ckpts):
        for j, zero in enumerate(stages):
            ax = axes[i][j]
            cell = [next(r for r in rows if (r["zero"], r["checkpointing"], r["micro_batch_size"]) == (zero, ckpt, m))
                    for m in micros]  # fmt: skip
            bottom = [0.0] * len(micros)
            for name in CATEGORY_GROUPS:
                heights = [group(r, CATEGORY_GROUPS)[name] / scale for r in cell]
                alphas = [1.0 if budget is None or r["total"] <= budget else 0.35 for r in cell]
                for k, (h, b, a) in enumerate(zip(heights, bottom, alphas)):
                    ax.bar(k, h, bottom=b, color=COLORS[name], alpha=a, width=0.75)
                bottom = [b + h for b, h in zip(bottom, heights)]
            ymax = draw_limits(ax, args.gpu_memory, args.margin if args.gpu_memory else 0.0, top, scale, unit,
                               clip=_CLIP)  # fmt: skip
            for k, total in enumerate(bottom):  # bars cut off by the axis: their value at the top
                if total > ymax:
                    ax.text(k, ymax * 0.985, f"{total:,.0f}\u2191", ha="center", va="top", fontsize="x-small",
                            color="#444444")  # fmt: skip
            ax.set_xticks(range(len(micros)), [str(m) for m in micros])
            stage = "plain torch" if args.engine == "torch" else f"ZeRO-{zero}"
            ax.set_title(f"{stage}, checkpointing {'on' if ckpt else 'off'}", fontsize="medium")
            if i == len(ckpts) - 1:
                ax.set_xlabel(f"micro-batch (x {args.seq_len} tokens)")
            if j == 0:
                ax.set_ylabel(f"per rank ({unit})")
            ax.grid(axis="y", alpha=0.3)
    lines, line_labels = axes[0][0].get_legend_handles_labels()
    handles = legend_patches(list(CATEGORY_GROUPS)) + lines
    labels = list(CATEGORY_GROUPS) + line_labels
    if budget is not None:
        handles.append(plt.Rectangle((0, 0), 1, 1, color="#969696", alpha=0.35))
        labels.append("faded: does not fit the budget")
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize="small", frameon=False)
    fig.suptitle(_title(args), fontsize="medium")
    fig.tight_layout(rect=(0, 0.1 if len(labels) > 5 else 0.07, 1, 1))
    return fig


def _table(rows: "list[dict[str, Any]]", args: argparse.Namespace) -> str:
    micros = sorted({r["micro_batch_size"] for r in rows})
    unit = "GiB" if max(r["total"] for r in rows) >= 2**30 else "MiB"
    budget = None if args.gpu_memory is None else args.gpu_memory * (1 - args.margin)
    head = f"{'setting':<26}" + "".join(f" | {f'mb {m}':>11}" for m in micros)
    lines = [head, "-" * len(head)]
    for zero in sorted({r["zero"] for r in rows}):
        for ckpt in sorted({r["checkpointing"] for r in rows}):
            cells = [r for r in rows if (r["zero"], r["checkpointing"]) == (zero, ckpt)]
            stage = "plain torch" if args.engine == "torch" else f"ZeRO-{zero}"
            name = f"{stage}, {'ckpt' if ckpt else 'no ckpt'}"
            marks = ["" if budget is None or r["total"] <= budget else "*" for r in cells]
            lines.append(f"{name:<26}" + "".join(f" | {format_bytes(r['total'], unit):>10}{m:1}"
                                                  for r, m in zip(cells, marks)))  # fmt: skip
    if budget is not None:
        lines.append(f"* does not fit {format_bytes(args.gpu_memory)} with {args.margin:.0%} kept free")
    return "\n".join(lines)


def run_plot(args: argparse.Namespace) -> int:
    """Handler of ``plot``: compute the grid, write the PNG (``--out``), print the totals (or ``--json``)."""
    args = prepare(args, PLOT_RULES)
    if isinstance(args.model_value, int):
        raise ValueError(f"Expected a model with shapes to plot against the micro-batch, got the parameter count"
                         f" {args.model!r}. Fix: pass a preset, a Hub id or a config.json.")  # fmt: skip
    if args.out is None and not args.json:
        raise ValueError("Expected --out FILE.png (the plot) or --json (its data), got neither. Fix: add"
                         " --out memory.png.")  # fmt: skip
    rows = memory_grid(
        args.model_value, seq_len=args.seq_len, micro_batches=args.micro_batches,
        zero_stages=(0,) if args.engine == "torch" else parse_stages(args.zero_stages),
        checkpointing=_CHECKPOINTING[args.checkpointing], world_size=args.gpus, **common_kwargs(args),
    )  # fmt: skip
    path = None
    if args.out:
        from lightning_memopt.core.plotting import save

        path = str(save(figure(rows, args), args.out))
    if args.json:
        print_json({"rows": rows, "device_memory": args.gpu_memory, "margin": args.margin, "png": path})
        return 0
    print(_title(args))
    print(_table(rows, args))
    print(f"\nwrote {path}")
    return 0
