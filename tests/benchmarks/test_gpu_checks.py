"""benchmarks/gpu_checks.py on a CPU machine: ``--list`` names every check; without CUDA it exits with the fix; the
driver runs its checks in children and writes the summary (``--smoke``)."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, assert_refuses_without_cuda, listed_names

SCRIPT = ROOT / "benchmarks" / "gpu_checks.py"


def test_list_names_every_check():
    assert listed_names(SCRIPT) == ["accuracy", "speed", "liger_numerics", "gpu_tests"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_exits_with_a_clear_message(tmp_path):
    assert_refuses_without_cuda(SCRIPT, tmp_path / "out")


@pytest.mark.slow
def test_smoke_runs_the_driver_and_records_what_needs_cuda_as_skipped(tmp_path):
    """The driver's own plumbing on the CPU (the accuracy and speed scripts have their own smoke tests)."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out-dir", str(tmp_path), "--only",
                           "liger_numerics", "gpu_tests"], capture_output=True, text=True, check=False,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"].startswith("CPU (smoke")
    results = summary["results"]
    assert results["liger_numerics"]["status"] == "ok"
    assert results["liger_numerics"]["skipped"] == "Liger's Triton kernels need CUDA"
    assert results["gpu_tests"]["status"] == "skipped: the GPU-marked tests need CUDA"
