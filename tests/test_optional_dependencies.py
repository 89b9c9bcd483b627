"""The extras are optional for real: with liger-kernel, flash-attn, peft and matplotlib hidden (a fresh process
where importing them fails and their distributions are not found), the package imports, the strategy and callbacks
resolve, the CLI estimates, and each feature that needs a hidden package says which extra installs it."""

import json
import subprocess
import sys
import textwrap

from helpers import ROOT

HIDDEN = {"liger_kernel": "liger-kernel", "flash_attn": "flash-attn", "peft": "peft", "matplotlib": "matplotlib"}

SCRIPT = textwrap.dedent(
    """
    import importlib.machinery, importlib.metadata, json, sys
    HIDDEN = json.loads(sys.argv[1])

    class PathFinderWithout(importlib.machinery.PathFinder):  # the path finder, blind to the hidden packages
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                return None
            return super().find_spec(name, path, target)

    sys.meta_path[:] = [PathFinderWithout if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    _version = importlib.metadata.version
    def version(dist):
        if dist in HIDDEN.values() or dist.replace("-", "_") in HIDDEN:
            raise importlib.metadata.PackageNotFoundError(dist)
        return _version(dist)
    importlib.metadata.version = version
    import lightning_utilities.core.imports as lu_imports
    lu_imports._version = version  # RequirementCache reads versions through this name

    out = {}
    def attempt(key, fn):
        try:
            fn()
            out[key] = "ok"
        except ModuleNotFoundError as err:
            out[key] = str(err)

    import lightning_memopt
    attempt("root", lambda: (lightning_memopt.MemOptStrategy, lightning_memopt.MemoryMonitor,
                             lightning_memopt.BatchPlanner, lightning_memopt.LigerKernel))
    from lightning_memopt.cli import main
    attempt("cli", lambda: main(["estimate", "llama-3-8b", "--gpus", "8", "--zero", "3", "--no-cache"]))

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64)
    attempt("liger", lambda: lightning_memopt.apply_liger(LlamaForCausalLM(config), allow_cpu=True))
    attempt("lora", lambda: lightning_memopt.estimate_memory(config.to_dict(), lora_rank=4, seq_len=8))
    attempt("plot", lambda: lightning_memopt.MemoryMonitor(plot=True))
    attempt("flash", lambda: lightning_memopt.apply_attention(LlamaForCausalLM(config), "flash_attention_2"))
    out["loaded"] = sorted(m for m in HIDDEN if m in sys.modules)
    print("RESULT", json.dumps(out))
    """
)


def test_the_package_works_without_its_extras_and_names_the_extra_to_install():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(HIDDEN)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    assert out["root"] == "ok"
    assert out["cli"] == "ok"
    assert "per GPU" in proc.stdout or "GiB" in proc.stdout  # the estimate was printed
    assert "lightning-memopt[liger]" in out["liger"], out["liger"]
    assert "lightning-memopt[peft]" in out["lora"], out["lora"]
    assert "lightning-memopt[plot]" in out["plot"], out["plot"]
    assert "lightning-memopt[flash]" in out["flash"], out["flash"]
    assert out["loaded"] == []
