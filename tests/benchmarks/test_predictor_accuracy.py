"""The predictor against real MemOptStrategy runs: ``benchmarks/predictor_accuracy.py --quick`` (one 2-process launch).

The quick subset is 4 configurations (one per ZeRO stage; together every family, precision, attention and
checkpointing setting) x 2 ranks = 8 measured per-rank peaks, about 30 s on 2 cores.
"""

import json
import statistics

import pytest
from helpers import ROOT, run_script

SCRIPT = ROOT / "benchmarks" / "predictor_accuracy.py"

@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("predictor_accuracy") / "quick.json"
    run_script(SCRIPT, "--quick", "--out", str(out), timeout=240)
    return json.loads(out.read_text())


@pytest.mark.distributed
def test_quick_subset_measures_every_rank_of_every_configuration_in_one_launch(quick):
    rows = quick["rows"]
    assert quick["configurations"] == 4
    assert sorted((r["zero"], r["rank"]) for r in rows) == [(z, r) for z in range(4) for r in (0, 1)]
    assert {r["family"] for r in rows} == {"llama", "qwen2", "plain"}
    for row in rows:
        # predicted with the settings the run really had (stage, resolved buckets, precision, checkpointing, ...)
        assert row["settings_match"], row["settings_diff"]
        # the steady state is steady (steps 2..3 peak within DeepSpeed's run-to-run noise, <= 1.5 % in the full
        # matrix) and holds the Adam states that the first step creates
        assert row["steady_spread"] <= 0.02 * row["measured"], row
        assert row["measured"] > row["first_step"] > 0, row
        # ZeRO-0 fp32 holds at least parameters, gradients and Adam's two states: 16 bytes per parameter
        if row["zero"] == 0 and row["precision"] == "32-true":
            assert row["measured"] > 16 * row["n_params"], row
        # every allocation (kernel workspaces too) is at least the live tensors, measured in the same steps
        assert row["measured_allocations"] >= 0.99 * row["measured"], row
    analytic = [abs(r["analytic_error_pct"]) for r in rows]
    summary = {(s["family"], s["method"]): s for s in quick["summary"]}
    assert summary[("all", "analytic")]["median_abs_error_pct"] == pytest.approx(statistics.median(analytic))


@pytest.mark.distributed
def test_quick_subset_errors_within_the_issue_targets(quick):
    """Against each rank's peak of live tensors (2026-11-25: analytic median 0.06 %, worst 0.19 %; trace median
    0.01 %, worst 0.07 %)."""
    analytic = [abs(r["analytic_error_pct"]) for r in quick["rows"]]
    assert statistics.median(analytic) <= 1.0
    assert max(analytic) <= 3.0
    assert statistics.median(abs(r["trace_error_pct"]) for r in quick["rows"]) <= 0.5


@pytest.mark.distributed
def test_zero3_plain_pytorch_attention_through_memoptstrategy(tmp_path):
    """ZeRO-3 with nn.MultiheadAttention (SDPA): its packed projection stays gathered into backward (views saved by
    DeepSpeed's Linear). Before that was modelled: analytic -2.9 %, trace -2.3 % on both ranks; measured 2026-11-25:
    -0.54 % and +0.07 %, except that one rank of one run in five measured 256 KiB more (-2.08 % and -1.48 %; run-to-run
    noise of ZeRO-3, the size of one 64K-element fp32 tensor, not explained), hence the bounds."""
    out = tmp_path / "zero3_plain.json"
    run_script(SCRIPT, "--families", "plain", "--stages", "3", "--precisions", "32-true", "--attention", "sdpa",
               "--checkpointing", "off", "--steps", "3", "--out", str(out), timeout=240)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for row in rows:
        assert row["settings_match"], row["settings_diff"]
        assert abs(row["analytic_error_pct"]) <= 2.5, row
        assert abs(row["trace_error_pct"]) <= 2.0, row
