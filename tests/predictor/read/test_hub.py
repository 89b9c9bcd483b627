"""Hub ids resolve through transformers from a prepared local cache (never the network), or fail with the fix."""

import os
import subprocess
import sys

import pytest

from helpers import ROOT, write_hub_cache
from lightning_memopt.predictor import resolve_model
from lightning_memopt.predictor.read.hub import is_hub_id, load_hub_config
from lightning_memopt.predictor.read.presets import get_preset


@pytest.fixture
def cache(tmp_path):
    write_hub_cache(tmp_path / "hub", "meta-llama/Llama-3.1-8B", get_preset("llama-3.1-8b"))
    write_hub_cache(tmp_path / "hub", "acme/frobnicator-1b", {"model_type": "frobnicator", "hidden_size": 8})
    return tmp_path / "hub"


def test_is_hub_id():
    assert is_hub_id("Qwen/Qwen3-30B-A3B") and is_hub_id("google/gemma-2-9b")
    assert not any(map(is_hub_id, ["gpt2", "a/b/c", "configs/x.json", "./x/y", "/abs/path", "a/../b", "8B"]))


def test_a_cached_hub_id_loads_offline(cache):
    config = load_hub_config("meta-llama/Llama-3.1-8B", cache_dir=cache, local_files_only=True)
    assert type(config).__name__ == "LlamaConfig" and config.num_key_value_heads == 8


def test_missing_offline_names_the_cache_and_the_preset(cache):
    with pytest.raises(ValueError, match="Expected the Hub id 'meta-llama/Llama-3.1-70B' in the local") as err:
        load_hub_config("meta-llama/Llama-3.1-70B", cache_dir=cache, local_files_only=True)
    assert str(cache) in str(err.value) and "preset 'llama-3.1-70b'" in str(err.value)
    with pytest.raises(ValueError, match="Fix: .*HF_HUB_CACHE") as err:
        load_hub_config("nobody/nothing", cache_dir=cache, local_files_only=True)
    assert "preset" not in str(err.value)


def test_an_unknown_model_type_is_refused_without_running_code(cache):
    with pytest.raises(ValueError, match="Expected a model type that transformers knows.*frobnicator"):
        load_hub_config("acme/frobnicator-1b", cache_dir=cache, local_files_only=True)


def test_resolve_model_and_the_cli_read_the_cache_from_the_environment(cache):
    """HF_HUB_CACHE and HF_HUB_OFFLINE as a user sets them, in a fresh process (huggingface_hub reads them at
    import)."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    code = ("from lightning_memopt.predictor import resolve_model;"
            "print(resolve_model('meta-llama/Llama-3.1-8B').num_parameters)")
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) == resolve_model("llama-3.1-8b").num_parameters
