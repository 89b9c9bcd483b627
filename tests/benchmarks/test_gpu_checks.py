"""benchmarks/gpu_checks.py on a CPU machine: ``--list`` names every check; without CUDA it exits with the fix."""

import subprocess
import sys

import pytest
import torch
from helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_checks.py"


def test_list_names_every_check():
    out = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in out.splitlines()]
    assert names == ["zero_stages", "predictor_accuracy", "liger_numerics", "throughput", "monitor"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_exits_with_a_clear_message(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out-dir", str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "expected a CUDA GPU, got none" in proc.stderr
    assert not any(tmp_path.iterdir())
