"""examples/existing_project_ddp.py: a plain LightningModule under DDP (2 CPU processes) plus the three callbacks."""

import re

import pytest

from helpers import ROOT, run_script


@pytest.mark.slow  # a 2-process DDP project (15 s)
def test_plain_ddp_project_trains_with_the_three_callbacks(tmp_path):
    proc = run_script(
        ROOT / "examples" / "existing_project_ddp.py", "--steps", "4", "--log-dir", str(tmp_path), timeout=180
    )
    out = proc.stdout + proc.stderr  # the monitor's summary is logged (stderr), the loss printed (stdout)
    first, last = map(float, re.search(r"loss: first step (\S+), last step (\S+) \(4 steps\)", out).groups())
    assert last < first, out
    # The monitor's end-of-fit summary: one row per rank, predicted and actual within 50 % of each other.
    rows = re.findall(r"^\s+(\d) \|\s+([\d.]+) MiB \|\s+([\d.]+) MiB \|", out, re.MULTILINE)
    assert sorted(int(rank) for rank, _, _ in rows) == [0, 1], out
    for _, predicted, actual in rows:
        assert 0.5 < float(predicted) / float(actual) < 1.5, out
    # The callbacks really switched the model: the CSV logger got the monitor's keys.
    metrics = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()[0]
    assert "memory/actual_peak_bytes" in metrics and "memory/predicted_peak_bytes" in metrics
