"""Launch ``monitor_run.py`` once per pytest session and argument set (shared by the callback test modules)."""

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # tests/, for helpers
from helpers import run_script

HERE = Path(__file__).resolve().parent

#: The run the planner test plans: MemOptStrategy ZeRO-1, 2 ranks, hidden 256, seq_len 64.
PLAN = {"zero": 1, "world_size": 2, "hidden": 256, "seq_len": 64, "micro_batch_size": 6, "accumulate_grad_batches": 2}


def launch(tmp_path_factory, *args: str) -> list[dict]:
    """Run ``monitor_run.py`` with ``args`` (once per session) and return each rank's JSON."""
    out = tmp_path_factory.getbasetemp() / ("monitor_" + "_".join(a.strip("-") for a in args))
    if not (out / "rank1.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        run_script(HERE / "monitor_run.py", *args, "--out", str(out), timeout=300)
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def plan_settings() -> dict:
    """``estimate_memory`` arguments of the planned run, read the way the callbacks read them."""
    from tiny_llm import CausalLM

    from lightning_memopt import MemOptStrategy
    from lightning_memopt.lightning._run_reader import strategy_settings

    module = CausalLM(hidden_size=PLAN["hidden"], num_layers=2)
    settings = strategy_settings(MemOptStrategy(zero=PLAN["zero"]), module)
    settings.update(
        world_size=PLAN["world_size"],
        precision="bf16-mixed",
        optimizer="adamw",
        accumulate_grad_batches=PLAN["accumulate_grad_batches"],
        example_batch=torch.randint(0, 256, (1, PLAN["seq_len"])),  # a batch of the run's windows
    )
    return {"model": module, **settings}


def planner_args() -> tuple[str, ...]:
    """A device memory whose budget (90 %) holds micro-batch 6 with accumulation 2 exactly, and a global batch that
    needs accumulation 2."""
    from lightning_memopt.planning import estimate_memory

    peak = estimate_memory(**plan_settings(), micro_batch_size=PLAN["micro_batch_size"]).total
    device_memory = math.ceil(peak / 0.9) + 1
    tokens = PLAN["micro_batch_size"] * PLAN["seq_len"] * PLAN["world_size"] * PLAN["accumulate_grad_batches"]
    return ("--zero", "1", "--plan", str(device_memory), "--global-tokens", str(tokens))
