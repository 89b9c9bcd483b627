"""The pure part of MemoryMonitor's report: the fit-check message, a per-rank summary, its table and the PNG plot."""

import itertools
from pathlib import Path
from typing import Any

from lightning_memopt.core.units import format_bytes
from lightning_memopt.measuring.memory_steps import prediction_error

__all__ = ["describe_fix", "fit_check_message", "plot_history", "prediction_error", "save_plot", "summarize",
           "summary_table", "unit_for"]  # fmt: skip


def unit_for(num_bytes: int) -> str:
    """``"GiB"`` from 1 GiB on, else ``"MiB"``: the unit the monitor prints a size in."""
    return "GiB" if num_bytes >= 2**30 else "MiB"


def describe_fix(fix: Any) -> str:
    """One suggestion as ``"<change> -> <predicted peak> (fits|too large)"``."""
    verdict = "fits" if fix.fits else "too large"
    return f"{fix.description} -> {format_bytes(fix.predicted_total, unit_for(fix.predicted_total))} ({verdict})"


def fit_check_message(estimate: Any, device_memory: int, margin: float, fixes: list) -> str:
    """The fit check's error: the budget, the predicted breakdown, the ranked suggestions with their peaks."""
    unit = unit_for(device_memory)
    budget = int(device_memory * (1.0 - margin))
    lines = [f"  {i}. {describe_fix(fix)}" for i, fix in enumerate(fixes, 1)] or ["  (none found)"]
    return (
        f"Expected the predicted peak per rank to fit in {format_bytes(budget, unit)}"
        f" ({format_bytes(device_memory, unit)} with {margin:.0%} kept free), got {format_bytes(estimate.total, unit)}."
        f"\n{estimate.table(unit)}\n"
        "Fix: one of these changes (cheapest first), each with its predicted peak:\n" + "\n".join(lines)
    )


def summarize(history: "list[dict[str, Any]]") -> "list[dict[str, Any]]":
    """Per rank over the logged steps: the highest predicted and actual peaks and their error; on CUDA also the
    reserved peak and the device's used memory (total - free), each beside its prediction where there is one.

    Args:
        history: rows with ``rank``, ``predicted_peak_bytes``, ``actual_peak_bytes``, ``reserved_bytes`` (-1: none),
            ``device_total_bytes`` and ``device_free_bytes``; optionally ``predicted_reserved_bytes`` and
            ``predicted_device_bytes`` (``None``: not predicted).

    Example:
        >>> summarize([{"rank": 0, "predicted_peak_bytes": 110, "actual_peak_bytes": 100, "reserved_bytes": -1,
        ...             "device_total_bytes": 1000, "device_free_bytes": 600}])[0]["prediction_error"]
        0.1
    """
    out = []
    for rank in sorted({row["rank"] for row in history}):
        rows = [row for row in history if row["rank"] == rank]
        predicted = max(row["predicted_peak_bytes"] for row in rows)
        actual = max(row["actual_peak_bytes"] for row in rows)
        reserved = max(row["reserved_bytes"] for row in rows)
        on_cuda = reserved >= 0  # the device's used memory means the run's only on a GPU
        out.append({"rank": rank, "predicted_peak_bytes": predicted, "actual_peak_bytes": actual,
                    "prediction_error": prediction_error(predicted, actual) if predicted >= 0 else None,
                    "reserved_bytes": reserved if on_cuda else None,
                    "predicted_reserved_bytes": _highest(rows, "predicted_reserved_bytes"),
                    "device_used_bytes": max(r["device_total_bytes"] - r["device_free_bytes"] for r in rows)
                    if on_cuda else None,
                    "predicted_device_bytes": _highest(rows, "predicted_device_bytes"),
                    "device_total_bytes": rows[-1]["device_total_bytes"]})  # fmt: skip
    return out


def _highest(rows: "list[dict[str, Any]]", key: str) -> "int | None":
    values = [row[key] for row in rows if row.get(key) is not None]
    return max(values) if values else None


def summary_table(summary: "list[dict[str, Any]]") -> str:
    """The :func:`summarize` rows as a text table (MiB; the device in GiB). On CUDA, two more columns: reserved and
    the device's used memory, each as ``actual / predicted`` (``-`` where not predicted).

    Example:
        >>> row = {"rank": 0, "predicted_peak_bytes": 110 * 2**20, "actual_peak_bytes": 100 * 2**20,
        ...        "prediction_error": 0.1, "reserved_bytes": 120 * 2**20, "predicted_reserved_bytes": 118 * 2**20,
        ...        "device_used_bytes": 900 * 2**20, "predicted_device_bytes": None, "device_total_bytes": 2**34}
        >>> print(summary_table([row]).splitlines()[2])
           0 |   110.00 MiB |   100.00 MiB |  +10.0% |     120.00 / 118.00 MiB |          900.00 / - MiB |    16.00 GiB
    """
    cuda = any(row["reserved_bytes"] is not None for row in summary)
    extra = f" | {'reserved: act / pred':>23} | {'device used: act / pred':>23}" if cuda else ""
    header = f"{'rank':>4} | {'predicted':>12} | {'actual':>12} | {'error':>7}{extra} | {'device':>12}"
    lines = [header, "-" * len(header)]
    for row in summary:
        known = row["prediction_error"] is not None  # no prediction: the model could not be predicted
        predicted = format_bytes(row["predicted_peak_bytes"], "MiB") if known else "-"
        error = f"{row['prediction_error']:>+7.1%}" if known else f"{'-':>7}"
        pairs = ""
        if cuda:
            reserved = _pair(row["reserved_bytes"], row.get("predicted_reserved_bytes"))
            pairs = f" | {reserved:>23} | {_pair(row['device_used_bytes'], row.get('predicted_device_bytes')):>23}"
        lines.append(
            f"{row['rank']:>4} | {predicted:>12} |"
            f" {format_bytes(row['actual_peak_bytes'], 'MiB'):>12} | {error}{pairs} |"
            f" {format_bytes(row['device_total_bytes'], 'GiB'):>12}"
        )
    return "\n".join(lines)


def _pair(actual: "int | None", predicted: "int | None") -> str:
    """``"<actual> / <predicted> MiB"`` with ``-`` for what is unknown."""
    if actual is None and predicted is None:
        return "-"
    one = "-" if actual is None else format_bytes(actual, "MiB").removesuffix(" MiB")
    two = "-" if predicted is None else format_bytes(predicted, "MiB").removesuffix(" MiB")
    return f"{one} / {two} MiB"


_LINE_COLORS = ("#000000", "#6a3d9a", "#33a02c", "#b15928", "#e7298a", "#1b9e77", "#666666", "#a6761d")


def save_plot(
    history: "list[dict[str, Any]]", path: "str | Path", device_memory: "int | None" = None, margin: float = 0.0
) -> Path:
    """Write :func:`plot_history`'s figure to a PNG; returns its path.

    Raises:
        ModuleNotFoundError: without matplotlib (``pip install 'lightning-memopt[plot]'``).
    """
    from lightning_memopt.core.plotting import save

    return save(plot_history(history, device_memory, margin), path)


def plot_history(history: "list[dict[str, Any]]", device_memory: "int | None" = None, margin: float = 0.0) -> Any:
    """The predicted breakdown (stacked bands) with each rank's actual peak over it and the device line (a Figure).

    The bands are rank zero's predicted categories at each logged step (``predicted/<category>`` keys of its rows:
    model states, activations, logits, buffers; what the predicted peak adds on top, e.g. offloaded states on a CPU
    device, as "other"); the lines are every rank's measured peak. On CUDA, thin lines add rank zero's reserved peak
    and the device's used memory, with their predictions (dotted) where there are any. The y axis starts at zero; the
    device (``device_memory``, with its ``margin`` as the budget line) is drawn when it is within three times the
    data.

    Raises:
        ModuleNotFoundError: without matplotlib (``pip install 'lightning-memopt[plot]'``).
    """
    from lightning_memopt.core.plotting import (
        COLORS,
        MONITOR_GROUPS,
        draw_limits,
        group,
        legend_patches,
        pyplot,
        unit_for,
    )

    plt = pyplot("MemoryMonitor's plot")
    ranks = sorted({row["rank"] for row in history})
    first = [row for row in history if row["rank"] == ranks[0]]
    steps = [row["step"] for row in first]
    bands = [group({k[len("predicted/"):]: v for k, v in row.items() if k.startswith("predicted/")}, MONITOR_GROUPS)
             for row in first]  # fmt: skip
    for row, band in zip(first, bands):
        band["other"] = max(0, row["predicted_peak_bytes"] - sum(band.values()))
    device_lines = _device_lines(first)
    top = max(max(r["actual_peak_bytes"] for r in history), max(r["predicted_peak_bytes"] for r in history), 1,
              *(max(values) for _, values, _, _ in device_lines))  # fmt: skip
    unit, scale = unit_for(top)
    width = 0.8 * min((b - a for a, b in itertools.pairwise(steps)), default=1)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bottom = [0.0] * len(steps)
    names = [name for name in (*MONITOR_GROUPS, "other") if any(band[name] for band in bands)]
    for name in names:
        heights = [band[name] / scale for band in bands]
        ax.bar(steps, heights, bottom=bottom, width=width, color=COLORS[name])
        bottom = [b + h for b, h in zip(bottom, heights)]
    for i, rank in enumerate(ranks):  # dark lines, told apart by colour, marker and dash (ranks often overlap)
        rows = [row for row in history if row["rank"] == rank]
        ax.plot([r["step"] for r in rows], [r["actual_peak_bytes"] / scale for r in rows], linewidth=1.5,
                color=_LINE_COLORS[i % len(_LINE_COLORS)], marker="os^Dv<>p"[i % 8], markersize=4,
                markerfacecolor="none", linestyle=("-", "--", "-.", ":")[i % 4],
                label=f"rank {rank}: actual peak")  # fmt: skip
    for label, values, color, style in device_lines:
        ax.plot(steps, [v / scale for v in values], linewidth=1.0, color=color, linestyle=style,
                label=f"rank {ranks[0]}: {label}")  # fmt: skip
    draw_limits(ax, device_memory, margin, top, scale, unit)
    handles, labels = ax.get_legend_handles_labels()
    patches = legend_patches(names)
    ax.legend(patches + handles, [f"predicted: {n}" for n in names] + labels, fontsize="small",
              loc="upper left", bbox_to_anchor=(1.01, 1.0))  # fmt: skip
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"memory per rank ({unit})")
    ax.set_title("MemoryMonitor: predicted breakdown (bars) and actual peak per rank (lines)", fontsize="medium")
    fig.tight_layout()
    return fig


def _device_lines(rows: "list[dict[str, Any]]") -> "list[tuple[str, list[int], str, str]]":
    """Rank zero's CUDA lines: (label, values per step, colour, line style); none on CPU or without the values."""
    if not rows or any(row.get("reserved_bytes", -1) < 0 for row in rows):
        return []
    lines = [("reserved", [row["reserved_bytes"] for row in rows], "#1f78b4", "--"),
             ("device used", [row["device_total_bytes"] - row["device_free_bytes"] for row in rows], "#e31a1c", "--")]
    for key, label, color in (("predicted_reserved_bytes", "predicted reserved", "#1f78b4"),
                              ("predicted_device_bytes", "predicted device", "#e31a1c")):
        if all(row.get(key) is not None for row in rows):
            lines.append((label, [row[key] for row in rows], color, ":"))
    return lines
