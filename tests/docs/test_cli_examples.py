"""Every ``lightning-memopt`` example in README.md and docs/*.md runs and exits 0.

The examples are the lines of the shell code blocks (```bash, ```sh, ```console or unlabelled) that start with
``lightning-memopt`` (after ``VAR=value`` assignments). They run in one fresh process (the command line's
``main``, what the console script calls), in a scratch directory, offline (``HF_HUB_OFFLINE=1``) with a prepared
Hugging Face cache that holds each Hub id an example names (its preset's config.json, the same file the Hub
serves), and next to a real MemOptStrategy checkpoint for ``consolidate``.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import ROOT, write_hub_cache
from lightning_memopt.predictor.read.hub import is_hub_id
from lightning_memopt.predictor.read.presets import preset_for_hub_id

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_SHELL = {"bash", "sh", "shell", "console", ""}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def cli_examples() -> "list[tuple[str, dict[str, str], list[str]]]":
    """``(where, environment assignments, argv after lightning-memopt)`` of every example."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for lang, body in _FENCE.findall(path.read_text()):
            if lang.strip() not in _SHELL:
                continue
            for line in body.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                env = {}
                while words and _ASSIGNMENT.match(words[0]):
                    key, value = words.pop(0).split("=", 1)
                    env[key] = value
                if words and words[0] == "lightning-memopt":
                    found.append((f"{path.relative_to(ROOT)}: {line.strip()[:70]}", env, words[1:]))
    return found


EXAMPLES = cli_examples()

_RUNNER = """
import contextlib, io, json, os, sys, time
from lightning_memopt.cli import main
results = []
for env, argv in json.load(sys.stdin):
    os.environ.update(env)
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results.append({"code": code, "out": out.getvalue()[-2000:], "err": err.getvalue()[-2000:],
                    "seconds": time.perf_counter() - start})
print(json.dumps(results))
"""


def _checkpoint(path) -> None:
    """A real sharded checkpoint of a one-step MemOptStrategy run (what ``consolidate`` merges)."""
    import lightning.pytorch as pl
    from tiny_llm import CausalLM, TextDataModule

    from lightning_memopt import MemOptStrategy

    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=MemOptStrategy(zero=2), precision="32-true",
                         max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(CausalLM(num_layers=1, hidden_size=32), TextDataModule(batch_size=2, seq_len=16))
    trainer.save_checkpoint(path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli_examples")
    cache = work / "hf-cache"
    cache.mkdir()
    for _, _, argv in EXAMPLES:
        for word in argv:
            if is_hub_id(word) and not (work / word).exists():
                preset = preset_for_hub_id(word)
                assert preset is not None, f"no preset holds the config of {word}: add one to prepare the cache"
                write_hub_cache(cache, word, preset.config())
        if argv[0] == "consolidate" and not (work / argv[1]).exists():
            _checkpoint(work / argv[1])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}  # fmt: skip
    payload = json.dumps([(example_env, argv) for _, example_env, argv in EXAMPLES])
    proc = subprocess.run([sys.executable, "-c", _RUNNER], input=payload, capture_output=True, text=True, env=env,
                          cwd=work, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_docs_have_examples_of_every_command():
    assert {argv[0] for _, _, argv in EXAMPLES} >= {"estimate", "plan", "plot", "presets", "consolidate"}
    assert any(is_hub_id(word) for _, _, argv in EXAMPLES for word in argv), "a Hub id example"


@pytest.mark.parametrize("index", range(len(EXAMPLES)), ids=[where for where, _, _ in EXAMPLES])
def test_example_runs(results, index):
    result = results[index]
    assert result["code"] == 0, f"{EXAMPLES[index][0]}\n{result['err']}\n{result['out']}"
    assert result["out"].strip()
