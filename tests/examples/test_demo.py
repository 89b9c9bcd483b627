"""examples/demo.py on CPU: 2 processes under ZeRO-2, a few steps; it tells the memory story and the loss falls."""

import re

import pytest

from helpers import ROOT, run_script


@pytest.mark.slow  # make demo end to end: 2 processes (26 s)
def test_demo_shows_where_the_memory_goes(tmp_path):
    proc = run_script(ROOT / "examples" / "demo.py", "--steps", "5", "--log-dir", str(tmp_path), timeout=240)
    out = (proc.stdout + proc.stderr).replace("\r", "\n")
    # before step one: the planned micro-batch and why, the predicted breakdown, the verdict
    largest = int(re.search(r"micro-batch \(largest that fits\)\s+\| (\d+)", out).group(1))
    budget = float(re.search(r"budget \(device - margin\)\s+\| ([\d.]+) MiB", out).group(1))
    beyond = float(re.search(rf"predicted at micro-batch {largest + 1}\s+\| ([\d.]+) MiB", out).group(1))
    assert beyond > budget, out
    predicted = float(re.search(r"total \(peak\)\s+\|\s+([\d.]+) MiB", out).group(1))
    assert re.search(rf"MemoryMonitor: fits: predicted peak {predicted:.2f} MiB <= budget {budget:.2f} MiB", out), out
    # while training: loss and actual / predicted memory of each step in the progress bar
    bars = re.findall(r"train_loss=([\d.]+), mem_MiB=([\d.]+), pred_MiB=([\d.]+)", out)
    assert len(bars) >= 5, out
    # at the end: actual vs predicted per rank (within 5 %), the plot, and the loss fell
    summary = re.findall(r"^\s+(\d) \|\s+([\d.]+) MiB \|\s+([\d.]+) MiB \|\s+([+-][\d.]+)%", out, re.MULTILINE)
    assert [rank for rank, *_ in summary] == ["0", "1"], out
    assert all(abs(float(error)) < 5 for *_, error in summary), summary
    plot = re.search(r"saved to (\S+memory_monitor\.png)", out).group(1)
    assert plot.startswith(str(tmp_path)) and (tmp_path / plot[len(str(tmp_path)) + 1 :]).stat().st_size > 10_000
    losses = re.search(r"train loss \(rank 0\): ([\d.]+) at the start -> ([\d.]+) after 5 steps", out)
    first, last = map(float, losses.groups())
    assert last < first, out
