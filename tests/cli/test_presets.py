"""``lightning-memopt presets``: every preset listed, filtered by kind, as a table or JSON."""

import json
import re

import pytest

from lightning_memopt.cli import main
from lightning_memopt.predictor.read.presets import CATALOG


def test_table_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(" | ")[0].strip() == "name" and len(lines) == 2 + len(CATALOG)
    assert {line.split(" | ")[0].strip() for line in lines[2:]} == {p.name for p in CATALOG}


def test_json_by_kind(capsys):
    assert main(["presets", "--kind", "moe", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {p.name for p in CATALOG if p.kind == "moe"}
    mixtral = next(r for r in rows if r["name"] == "mixtral-8x7b")
    assert mixtral == {"name": "mixtral-8x7b", "hub_id": "mistralai/Mixtral-8x7B-v0.1", "kind": "moe",
                       "size": "46.7B (12.9B active)", "model_type": "mixtral"}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("qwen3-30b-a3b", ["--seq-len", "256"]),  # MoE
        ("deepseek-v2-lite", ["--seq-len", "256"]),  # MoE with latent attention
        ("gemma-3-1b", ["--seq-len", "256"]),
        ("phi-3-mini", ["--seq-len", "256"]),
        ("bert-base", ["--seq-len", "128"]),  # encoder
        ("gemma-3-4b", ["--seq-len", "256"]),  # vision + language
    ],
)
def test_new_families_estimate_from_the_cli(name, extra, capsys):
    """They resolve, run and print (the numbers are the predictor's business, tested there)."""
    assert main(["estimate", name, *extra]) == 0
    first, *table = capsys.readouterr().out.splitlines()
    assert re.match(rf"{re.escape(name)} \(\d+\.\d\dB parameters\), 1 GPU\(s\)", first), first
    assert table[-1].startswith("total (peak)") and float(table[-1].split("|")[1].split()[0]) > 0
