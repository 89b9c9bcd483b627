"""benchmarks/gpu_checks.py on a CPU machine: ``--list`` names every check; without CUDA it exits with the fix."""

import subprocess
import sys

import pytest
import torch
from accuracy_targets import MEDIAN_PCT, WORST_PCT

from helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_checks.py"


def test_list_names_every_check():
    out = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in out.splitlines()]
    assert names == [
        "zero_stages", "predictor_accuracy", "predictor_families", "liger_numerics", "throughput", "monitor"
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_exits_with_a_clear_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out-dir", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert "expected a CUDA GPU, got none" in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_smoke_runs_every_check_on_cpu_and_writes_the_results(tmp_path):
    """``--smoke``: every check's own code and the plumbing (children, budgets, JSON files, tables) on the CPU at toy
    sizes, so the first GPU run does not find the script's bugs; what needs CUDA kernels is recorded as skipped."""
    import json

    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out-dir", str(tmp_path)], capture_output=True,
                          text=True, check=False, timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"].startswith("CPU (smoke")
    results = summary["results"]
    assert {name: r["status"] for name, r in results.items()} == dict.fromkeys(
        ["zero_stages", "predictor_accuracy", "predictor_families", "liger_numerics", "throughput", "monitor"], "ok"
    )
    assert [(r["strategy"], r["stage"]) for r in results["zero_stages"]["runs"]] == [("memopt", z) for z in range(4)]
    # bf16-mixed AdamW keeps at least 16 bytes per parameter (bf16 weights and gradients, fp32 master and 2 states)
    assert all(r["peak_bytes_per_param"] > 16 for r in results["zero_stages"]["runs"])
    # the predictor against the same loop's live tensors (Lightning's order: zero_grad after the forward)
    rows = results["predictor_accuracy"]["rows"]
    assert len(rows) == 4 and all(abs(r["error"]) <= WORST_PCT / 100 for r in rows), rows
    # eight families, from the module and from the config alone, against the same loop's live tensors
    families = results["predictor_families"]["rows"]
    assert len(families) == 8
    # every family within the median claim (0.5 %), tighter than the worst one
    assert all(abs(r[k]) <= MEDIAN_PCT / 100 for r in families for k in ("module_error", "config_error")), families
    assert results["liger_numerics"]["skipped"] == "Liger's Triton kernels need CUDA"
    skipped = [r["variant"] for r in results["throughput"]["runs"] if r.get("skipped")]
    assert skipped == ["eager+liger", "sdpa+liger"]
    assert {r["zero"] for r in results["monitor"]["per_step"]} == {0, 3}
    tables = (tmp_path / "tables.md").read_text()
    assert "predictor_accuracy" in tables and "| t5 (encoder-decoder) |" in tables
    assert "skipped: Liger's Triton kernels need CUDA" in tables
