"""The pure part of MemoryMonitor's report: the prediction error, a per-rank summary, its table and the PNG plot."""

import math
from pathlib import Path
from typing import Any

from lightning_memopt._imports import _MATPLOTLIB_AVAILABLE, requires
from lightning_memopt.utilities.units import format_bytes


def prediction_error(predicted: float, actual: float) -> float:
    """Signed relative error of a prediction: ``(predicted - actual) / actual``; positive means over-predicted.

    Example:
        >>> prediction_error(110, 100)
        0.1
        >>> prediction_error(0, 0)
        0.0
    """
    if actual <= 0:
        return 0.0 if predicted <= 0 else math.inf
    return (predicted - actual) / actual


def summarize(history: "list[dict[str, Any]]") -> "list[dict[str, Any]]":
    """Per rank over the logged steps: the highest predicted and actual peaks, their error, reserved and device.

    Args:
        history: rows with ``rank``, ``predicted_peak_bytes``, ``actual_peak_bytes``, ``reserved_bytes`` (-1: none)
            and ``device_total_bytes``.

    Example:
        >>> summarize([{"rank": 0, "predicted_peak_bytes": 110, "actual_peak_bytes": 100, "reserved_bytes": -1,
        ...             "device_total_bytes": 1000}])[0]["prediction_error"]
        0.1
    """
    out = []
    for rank in sorted({row["rank"] for row in history}):
        rows = [row for row in history if row["rank"] == rank]
        predicted = max(row["predicted_peak_bytes"] for row in rows)
        actual = max(row["actual_peak_bytes"] for row in rows)
        reserved = max(row["reserved_bytes"] for row in rows)
        out.append({"rank": rank, "predicted_peak_bytes": predicted, "actual_peak_bytes": actual,
                    "prediction_error": prediction_error(predicted, actual) if predicted >= 0 else None,
                    "reserved_bytes": None if reserved < 0 else reserved,
                    "device_total_bytes": rows[-1]["device_total_bytes"]})  # fmt: skip
    return out


def summary_table(summary: "list[dict[str, Any]]") -> str:
    """The :func:`summarize` rows as a text table (MiB; the device in GiB)."""
    header = (
        f"{'rank':>4} | {'predicted':>12} | {'actual':>12} | {'error':>7} | {'reserved':>12} | {'device':>12}"
    )
    lines = [header, "-" * len(header)]
    for row in summary:
        reserved = "-" if row["reserved_bytes"] is None else format_bytes(row["reserved_bytes"], "MiB")
        known = row["prediction_error"] is not None  # no prediction: the model could not be predicted
        predicted = format_bytes(row["predicted_peak_bytes"], "MiB") if known else "-"
        error = f"{row['prediction_error']:>+7.1%}" if known else f"{'-':>7}"
        lines.append(
            f"{row['rank']:>4} | {predicted:>12} |"
            f" {format_bytes(row['actual_peak_bytes'], 'MiB'):>12} | {error} |"
            f" {reserved:>12} | {format_bytes(row['device_total_bytes'], 'GiB'):>12}"
        )
    return "\n".join(lines)


def save_plot(history: "list[dict[str, Any]]", path: "str | Path") -> Path:
    """Plot actual (solid) and predicted (dashed) peaks per logged step and rank to a PNG; returns its path.

    Raises:
        ModuleNotFoundError: without matplotlib (``pip install 'lightning-memopt[plot]'``).
    """
    requires(_MATPLOTLIB_AVAILABLE, "MemoryMonitor's plot", "plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for rank in sorted({row["rank"] for row in history}):
        rows = [row for row in history if row["rank"] == rank]
        steps = [row["step"] for row in rows]
        line = ax.plot(steps, [row["actual_peak_bytes"] / 2**20 for row in rows], label=f"rank {rank} actual")
        if all(row["predicted_peak_bytes"] >= 0 for row in rows):
            ax.plot(steps, [row["predicted_peak_bytes"] / 2**20 for row in rows], "--", color=line[0].get_color(),
                    label=f"rank {rank} predicted")  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("peak memory per step (MiB)")
    ax.set_title("MemoryMonitor: actual vs predicted")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
