"""MemoryMonitor's plot: predicted bands from zero that add up to the predicted peak, one line per rank, the device."""

import pytest

from lightning_memopt.core.plotting import pyplot
from lightning_memopt.lightning.callbacks._memory_report import plot_history, save_plot, summarize, summary_table

MiB = 2**20
PARTS = {"parameters": 2 * MiB, "gradients": MiB, "optimizer_states": 4 * MiB, "activations": 12 * MiB,
         "logits": 3 * MiB, "buffers": MiB // 2, "cpu_offloaded": 0}  # fmt: skip


def history(breakdown: bool = True) -> list:
    rows = []
    for step in (1, 2, 3):
        for rank in (0, 1):
            row = {"step": step, "rank": rank, "actual_peak_bytes": (22 + rank) * MiB - step,
                   "predicted_peak_bytes": sum(PARTS.values()) + MiB}  # 1 MiB more than the parts: "other"
            if breakdown and rank == 0:
                row.update({f"predicted/{k}": v for k, v in PARTS.items()})
            rows.append(row)
    return rows


def test_bands_add_up_to_the_predicted_peak_and_the_axis_starts_at_zero():
    fig = plot_history(history(), device_memory=32 * MiB, margin=0.1)
    ax = fig.axes[0]
    tops = {}
    for bar in ax.patches:
        tops[bar.get_x()] = max(tops.get(bar.get_x(), 0), bar.get_y() + bar.get_height())
    assert len(tops) == 3 and all(t == pytest.approx((sum(PARTS.values()) + MiB) / MiB) for t in tops.values())
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 32
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:5] == ["predicted: model states", "predicted: activations", "predicted: logits",
                          "predicted: buffers", "predicted: other"]  # fmt: skip
    assert {"rank 0: actual peak", "rank 1: actual peak", "device (32.0 MiB)"} <= set(labels)
    pyplot("test").close(fig)


def test_without_a_breakdown_the_prediction_is_one_band(tmp_path):
    path = save_plot(history(breakdown=False), tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plot_history(history(breakdown=False))
    assert fig.axes[0].get_legend().get_texts()[0].get_text() == "predicted: other"
    pyplot("test").close(fig)


def cuda_history(predicted_reserved: "int | None") -> list:
    """Rows as the monitor logs them on one GPU: reserved, the device's free memory, the predicted totals."""
    rows = history()
    for row in rows:
        row.update(reserved_bytes=row["actual_peak_bytes"] + 4 * MiB, device_total_bytes=80 * MiB,
                   device_free_bytes=40 * MiB - row["step"] * MiB, predicted_reserved_bytes=predicted_reserved,
                   predicted_device_bytes=None)  # fmt: skip
    return rows


def test_on_cuda_the_summary_shows_reserved_and_the_device_beside_their_predictions():
    summary = summarize(cuda_history(predicted_reserved=27 * MiB))
    assert [row["rank"] for row in summary] == [0, 1]
    rank1 = summary[1]
    assert rank1["reserved_bytes"] == 23 * MiB - 1 + 4 * MiB  # the highest step's
    assert rank1["device_used_bytes"] == 80 * MiB - (40 * MiB - 3 * MiB)  # total - free, at its highest
    assert (rank1["predicted_reserved_bytes"], rank1["predicted_device_bytes"]) == (27 * MiB, None)
    lines = summary_table(summary).splitlines()
    assert "reserved: act / pred" in lines[0] and "device used: act / pred" in lines[0]
    assert "27.00 / 27.00 MiB" in lines[3]  # rank 1: 27 MiB reserved (rounded), 27 MiB predicted
    assert "43.00 / - MiB" in lines[3]  # the device total is not predicted here


def test_on_cpu_the_summary_has_no_device_columns():
    rows = [dict(row, reserved_bytes=-1, device_total_bytes=80 * MiB, device_free_bytes=40 * MiB)
            for row in history()]  # fmt: skip
    summary = summarize(rows)
    assert summary[0]["reserved_bytes"] is None and summary[0]["device_used_bytes"] is None
    assert "reserved" not in summary_table(summary)


def test_on_cuda_the_plot_draws_reserved_and_the_device_with_the_predictions_it_has():
    fig = plot_history(cuda_history(predicted_reserved=27 * MiB))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert {"rank 0: reserved", "rank 0: device used", "rank 0: predicted reserved"} <= set(labels)
    assert "rank 0: predicted device" not in labels  # not predicted: no line
    assert fig.axes[0].get_ylim()[1] >= 80 * MiB / MiB - 37  # the device's used memory fits on the axis
    pyplot("test").close(fig)
