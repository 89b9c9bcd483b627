"""examples/finetune_hf.py --cpu: ZeRO-3 + checkpointing + SDPA on a Llama built from a config or loaded from a path."""

import re

import pytest

from helpers import ROOT, run_script

SCRIPT = ROOT / "examples" / "finetune_hf.py"


def _steps(out: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in re.findall(r"^step (\d+): loss (\S+)$", out, re.MULTILINE)}


@pytest.mark.parametrize("from_path", [False, True], ids=["from-config", "from-path"])
def test_finetune_runs_two_steps_on_cpu(tmp_path, from_path):
    args = ["--cpu", "--steps", "2", "--seq-len", "64"]
    if from_path:
        import torch
        from finetune_hf import PRESETS
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=256, **PRESETS["tiny"])).save_pretrained(tmp_path / "model")
        args += ["--model-path", str(tmp_path / "model")]
    losses = _steps(run_script(SCRIPT, *args, timeout=180).stdout)
    assert sorted(losses) == [1, 2]
    assert all(0 < loss < 10 for loss in losses.values()), losses


def test_finetune_without_cuda_and_without_cpu_flag_says_how_to_fix():
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "1"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 2
    assert "Expected a CUDA GPU, got none. Fix: pass --cpu" in proc.stderr
