"""MemoryMonitor's plot: predicted bands from zero that add up to the predicted peak, one line per rank, the device."""

import pytest

from lightning_memopt.core.plotting import pyplot
from lightning_memopt.lightning.callbacks._memory_report import plot_history, save_plot

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
