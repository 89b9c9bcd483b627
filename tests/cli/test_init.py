"""The command line stays on the predictor: it never imports Lightning, and it runs as a module.

(DeepSpeed may be imported: transformers' ``modeling_utils`` imports it when it is installed.)
"""

import os
import subprocess
import sys

from helpers import ROOT

# the package root imports the Lightning layer (until it is made lazy): load the CLI without running it
_BLOCKED = '''
import importlib.util, sys, types
spec = importlib.util.find_spec("lightning_memopt")
root = types.ModuleType("lightning_memopt")
root.__path__ = list(spec.submodule_search_locations)
sys.modules["lightning_memopt"] = root
from lightning_memopt.cli import main
for argv in (["presets", "--json"], ["estimate", "llama-3-8b", "--seq-len", "512", "--json"],
             ["plan", "gpt2", "--gpu-memory", "8GiB", "--seq-len", "512", "--global-batch-tokens", "64k", "--json"],
             ["plot", "gpt2", "--seq-len", "256", "--micro-batches", "1,2", "--out", sys.argv[1]]):
    assert main(argv) == 0, argv
imported = sorted(m for m in sys.modules if m.startswith(("lightning.pytorch", "lightning.fabric")))
assert not imported, f"the CLI imported {imported[:5]}"
'''


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)  # fmt: skip


def test_the_cli_never_imports_lightning(tmp_path):
    proc = _run("-c", _BLOCKED, str(tmp_path / "plot.png"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "plot.png").exists()


def test_python_dash_m_runs_the_cli():
    proc = _run("-m", "lightning_memopt.cli", "estimate", "gpt2", "--zero", "9")
    assert proc.returncode == 2 and "invalid choice: 9" in proc.stderr
