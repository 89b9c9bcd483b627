"""benchmarks/gpu_speed.py on a CPU machine: ``--list``, the message without CUDA, the budget plumbing, and (slow) the
whole suite in ``--smoke``."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_speed.py"
GROUPS = ["zero", "llama1b", "monitor"]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def test_list_names_every_group_and_its_parts():
    proc = _run("--list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == GROUPS
    assert "parts: hf" in lines[1] and "liger" in lines[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_exits_with_a_clear_message(tmp_path):
    proc = _run("--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "expected a CUDA GPU, got none" in proc.stderr and "Fix:" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_spent_budget_skips_every_part_and_still_writes_the_files(tmp_path):
    """With no time left no child starts; each part says why, and the targets say what is missing."""
    proc = _run("--smoke", "--budget-seconds", "1", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama1b.json", "monitor.json", "summary.json", "zero.json"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["parts"]) == {"zero", "hf", "liger", "monitor"}
    assert all(p["status"].startswith("skipped: the budget is spent") for p in summary["parts"].values())
    assert summary["groups"] == dict.fromkeys(GROUPS, "skipped")
    assert all(t["value"] is None and t["pass"] is None and "skipped" in t["missing"] for t in summary["targets"])


@pytest.mark.slow
def test_smoke_runs_every_group_on_cpu_and_computes_the_targets(tmp_path):
    """``--smoke``: every part's own code and the plumbing (children, shares of the budget, records, JSON, tables)
    on the CPU at toy sizes, the zero protocol with Lightning's strategy on a CPU stand-in; what needs CUDA is
    recorded as skipped, with the reason."""
    proc = _run("--smoke", "--budget-seconds", "500", "--out-dir", str(tmp_path), timeout=560)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama1b.json", "monitor.json", "summary.json", "zero.json"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] == "cpu (smoke)" and summary["smoke"] is True
    assert summary["groups"] == dict.fromkeys(GROUPS, "ok")
    assert summary["elapsed_s"] < 500
    units = {}
    for group in GROUPS:
        for part in json.loads((tmp_path / f"{group}.json").read_text())["parts"]:
            assert part["status"] == "ok"
            units.update({(part["part"], u["name"]): u for u in part["units"]})
    timed = [u for u in units.values() if "median_step_s" in u]
    assert len(timed) == 18 + 5 + 4 and all(u["iqr_rel"] >= 0 for u in timed)
    assert all(u["timed_steps"] >= 10 for u in timed if "arm" not in u)

    # zero: 2 rounds of one fit per (stage, arm), the second round in the reverse order, each from a clean state
    fits = [u for (part, _), u in units.items() if part == "zero" and "arm" in u]
    assert len(fits) == 18 and all(u["status"] == "ok" for u in fits)
    first, second = ([(u["stage"], u["arm"]) for u in fits if u["round"] == r] for r in (1, 2))
    assert first == [(s, a) for s in (1, 2, 3) for a in ("memopt", "lightning", "lightning+es")]
    assert second == first[::-1]
    for u in fits:
        assert u["clean"] and u["state_before"]["engines_alive"] == 0, u["state_before"]
        assert u["state_before"]["allocated_bytes"] < 2**20  # a ZeRO-3 fit of the toy model held 3.1 MB
        assert len(u["step_times_s"]) == u["timed_steps"] == 6 and u["warmup_steps"] == 2
        assert u["events_over_wall"] == pytest.approx(1, abs=0.01)
        assert u["basic_optimizer"] == "AdamW" and u["optimizer"].startswith("DeepSpeedZeroOptimizer")
        assert u["zero_optimization"]["stage"] == u["stage"]
        # bf16-mixed AdamW keeps at least 16 bytes per parameter (bf16 weights and gradients, fp32 master, 2 states)
        assert u["net_peak_allocated_bytes"] > 16 * u["n_parameters"]
    assert {u["strategy"] for u in fits if u["arm"] == "lightning+es" and u["stage"] == 2} == {
        "DeepSpeedStrategy(stage=2) + expandable segments (CPU stand-in)"}
    zero = json.loads((tmp_path / "zero.json").read_text())
    assert zero["protocol"]["warmup_steps"] == 2 and zero["protocol"]["rounds_max"] == 2
    assert zero["comparisons"] == summary["zero_comparisons"] and len(zero["comparisons"]) == 9
    for c in zero["comparisons"]:
        assert c["rounds"] == 2 and c["rounds_left_out"] == 0 and len(c["per_round"]) == 2
        assert c["low"] <= c["ratio"] <= c["high"] and c["half_width"] >= 0
        assert c["verdict"].startswith(("within 2 %", "slower by", "undecided: ")) and c["pass"] in (True, False, None)
    assert summary["plan"]["zero"]["rounds"] == 2

    # llama1b: the matmul peak, three variants and two budgets in one process; Liger skipped on the CPU
    assert units["hf", "matmul"]["tflops"] > 0
    eager, full = units["hf", "eager"], units["hf", "eager+checkpointing"]
    assert full["net_peak_allocated_bytes"] < eager["net_peak_allocated_bytes"]
    for share in (75, 50):
        budget = units["hf", f"eager+budget {share}%"]
        assert budget["budget_bytes"] == int(eager["net_peak_allocated_bytes"] * share / 100)
        assert budget["plan"]["predicted_peak"] <= budget["budget_bytes"] and budget["within_budget"]
        assert 0 < budget["plan"]["num_checkpointed"] <= budget["plan"]["num_blocks"]
    for name in ("sdpa+liger", "eager+liger"):
        assert units["liger", name]["status"] == "skipped: Liger's Triton kernels need CUDA (--smoke)"

    # monitor: without, with MemoryMonitor() at its defaults, without its allocation history, without again
    names = ("without MemoryMonitor (1)", "with MemoryMonitor() (2)", "with MemoryMonitor(snapshot_on_oom=False) (3)",
             "without MemoryMonitor (4)")
    assert [units["monitor", n]["monitor_kwargs"] for n in names] == [None, {}, {"snapshot_on_oom": False}, None]

    # the targets: computed where both sides ran, else the skip named; step time with its interval and verdict
    goals = {t["target"]: t for t in summary["targets"]}
    assert len(goals) == 15
    for label, goal in goals.items():
        if label.startswith(("budget", "MemoryMonitor", "ZeRO")):
            assert isinstance(goal["value"], float) and goal["pass"] in (True, False, None), goal
        else:
            assert goal["value"] is None and goal["pass"] is None
            assert "Triton kernels need CUDA" in goal["missing"], goal
        if label.startswith("ZeRO") and "step time" in label:
            assert goal["ci"][0] <= goal["value"] <= goal["ci"][1] and goal["rounds"] == 2 and "verdict" in goal
    within = goals["budget checkpointing at 75 % of the eager peak: peak allocated / budget"]["value"]
    budget = units["hf", "eager+budget 75%"]
    assert within == pytest.approx(budget["net_peak_allocated_bytes"] / budget["budget_bytes"])
    assert "| eager+budget 75% |" in summary["tables"] and "| 3 | lightning+es | 2 (2) |" in summary["tables"]
    assert "| 2 | MemOptStrategy / DeepSpeedStrategy + expandable segments (same allocator) |" in summary["tables"]
    assert summary["tables"] in proc.stdout
