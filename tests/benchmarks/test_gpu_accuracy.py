"""benchmarks/gpu_accuracy.py on a CPU machine: its groups, the message without CUDA, and its code paths at toy
sizes (``--smoke``), so that a GPU run does not find the script's bugs."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, assert_refuses_without_cuda, listed_names

SCRIPT = ROOT / "benchmarks" / "gpu_accuracy.py"


def test_list_names_every_group():
    assert listed_names(SCRIPT) == ["probe", "traces", "matrix", "zero"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_exits_with_a_clear_message(tmp_path):
    assert_refuses_without_cuda(SCRIPT, tmp_path / "out")


@pytest.mark.slow
def test_smoke_measures_every_configuration_of_a_kind_and_both_predictions(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--only", "matrix", "--kinds", "llama", "t5",
                           "--out-dir", str(tmp_path), "--budget-seconds", "400"], capture_output=True, text=True,
                          check=False, timeout=450)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "matrix.json").read_text())
    rows = data["matrix"]
    assert sorted(r["name"] for r in rows) == sorted(
        f"{k}:{a}:{c}:{b}" for k in ("llama", "t5") for a in ("eager", "sdpa") for c in (0, 1) for b in (1, 4)
    )
    for row in rows:
        assert row.get("error") is None, row
        assert row["leftover_bytes"] == 0 and len(row["steps"]) == 3
        assert all(row["predicted"][path]["allocated"] > 0 for path in ("module", "config"))
        assert all(step["allocated"] > step["start"] > 0 for step in row["steps"])
    assert [r["name"].split(":")[0] for r in data["expandable"]] == ["llama"] * 8
