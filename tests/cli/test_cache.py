"""The CLI's answer cache: a repeated question is answered from disk without torch; any change is a new key."""

import json
import os
import subprocess
import sys

import pytest

from lightning_memopt.cli import _cache, main


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(_cache.ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cli(*argv: str, env: dict) -> subprocess.CompletedProcess:
    code = (
        "import sys; from lightning_memopt.cli import main; c = main(sys.argv[1:]);"
        " print('torch' in sys.modules); sys.exit(c)"
    )
    cmd = [sys.executable, "-c", code, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)


def test_a_repeated_estimate_is_answered_from_disk_without_torch(cache):
    env = {**os.environ, _cache.ENV: str(cache)}
    argv = ("estimate", "gpt2", "--seq-len", "64", "--micro-batch", "2")
    first, second = _cli(*argv, env=env), _cli(*argv, env=env)
    assert first.returncode == second.returncode == 0, first.stderr
    assert first.stdout.splitlines()[-1] == "True" and second.stdout.splitlines()[-1] == "False"
    assert first.stdout.splitlines()[:-1] == second.stdout.splitlines()[:-1]
    assert len(list(cache.glob("*.json"))) == 1


def test_every_option_and_the_config_content_are_part_of_the_key(cache, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300}))
    assert main(["estimate", str(config), "--seq-len", "32"]) == 0
    small = capsys.readouterr().out
    assert main(["estimate", str(config), "--seq-len", "64"]) == 0  # another option: another answer
    assert capsys.readouterr().out != small and len(list(cache.glob("*.json"))) == 2
    config.write_text(config.read_text().replace('"hidden_size": 64', '"hidden_size": 128'))
    assert main(["estimate", str(config), "--seq-len", "32"]) == 0  # same options, new config
    assert capsys.readouterr().out != small and len(list(cache.glob("*.json"))) == 3


def test_a_hit_replays_the_stored_answer(cache, capsys):
    assert main(["estimate", "8B", "--engine", "torch"]) == 0
    first = capsys.readouterr().out
    (entry,) = cache.glob("*.json")
    entry.write_text(json.dumps({"stdout": "from the cache\n", "code": 0}))
    assert main(["estimate", "8B", "--engine", "torch"]) == 0
    assert capsys.readouterr().out == "from the cache\n"
    assert main(["estimate", "8B", "--engine", "torch", "--no-cache"]) == 0
    assert capsys.readouterr().out == first
    entry.write_text("{damaged")
    assert main(["estimate", "8B", "--engine", "torch"]) == 0  # a damaged entry is a miss, rewritten
    assert capsys.readouterr().out == first and json.loads(entry.read_text())["stdout"] == first


def test_plan_answers_are_cached_with_their_exit_code(cache, capsys):
    argv = ["plan", "70B", "--gpu-memory", "8GiB", "--seq-len", "1024", "--global-batch-tokens", "1M", "--no-offload"]
    assert main(argv) == 1  # nothing fits
    assert main(argv) == 1 and len(list(cache.glob("*.json"))) == 1


def test_off_and_hub_ids_are_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv(_cache.ENV, "off")
    assert _cache.cache_dir() is None
    monkeypatch.delenv(_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _cache.cache_dir() == tmp_path / "lightning_memopt" / "cli"
    hub = type("Args", (), {"model_value": "someone/some-model", "no_cache": False})()
    assert _cache.key(hub) is None
