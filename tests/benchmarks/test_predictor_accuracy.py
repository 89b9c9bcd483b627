"""The predictor against real runs: ``benchmarks/predictor_accuracy.py --quick``.

The quick subset (``QUICK`` in the script) holds every model kind and every value of every axis (single device and
``MemOptStrategy`` ZeRO 0-3, fp32 and bf16-mixed, eager and SDPA, checkpointing off and on): the single-device
configurations run in the test's subprocess, the ZeRO ones in one 2-process launch (gloo). Each rank's steady-state
peak counted by the counting allocator (every CPU allocation: code the predictor does not share) is compared with the
prediction for that rank, from the module and from the config alone, at the claim of ``benchmarks/accuracy_targets.py``.
The errors are computed here from the raw bytes of each row, not read from the script's own summary.
"""

import json
import statistics
import sys

import pytest

from helpers import ROOT, run_script

SCRIPT = ROOT / "benchmarks" / "predictor_accuracy.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy_kinds import CONFIG_ONLY, KINDS  # noqa: E402 (benchmarks/ is put on the path above)
from accuracy_report import CONVOLUTION_KINDS  # noqa: E402
from accuracy_targets import MEDIAN_PCT, WORST_PCT, scratch_allowance, within_claim  # noqa: E402
from predictor_accuracy import QUICK  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("predictor_accuracy") / "quick.json"
    run_script(SCRIPT, "--quick", "--out", str(out), timeout=400)
    return json.loads(out.read_text())


@pytest.mark.distributed
@pytest.mark.slow  # about 1 minute: `make test-slow`, which CI runs
def test_quick_subset_measures_every_kind_and_axis(quick: dict) -> None:
    rows = quick["rows"]
    assert quick["configurations"] == len(QUICK)
    assert quick["failed_runs"] == []
    assert {r["kind"] for r in rows} == set(KINDS)
    assert {r["stage"] for r in rows} == {"single", "0", "1", "2", "3"}
    assert {r["precision"] for r in rows} == {"32-true", "bf16-mixed"}
    assert {r["attention"] for r in rows} == {"eager", "sdpa", None}  # None: the CNN has no attention
    assert {r["checkpointing"] for r in rows} == {False, True}
    # every configuration measured on each of its ranks: the single-device ones once, the ZeRO ones on 2 ranks
    ranks = {}
    for r in rows:
        key = (r["kind"], r["stage"], r["precision"], r["attention"], r["checkpointing"])
        ranks.setdefault(key, []).append(r["rank"])
    assert len(ranks) == len(QUICK)
    for (_, stage, *_), seen in ranks.items():
        assert sorted(seen) == ([0] if stage == "single" else [0, 1])
    for row in rows:
        # predicted with the settings the run really had (stage, resolved buckets, precision, checkpointing, ...)
        assert row["settings_match"], row["settings_diff"]
        # the steady state is steady (steps 2..3 peak alike, up to the kernels' scratch, which the allocator sees and
        # which varies from step to step: 131 KB once for a bf16 SDPA row) and the step adds to what setup left
        scratch = scratch_allowance(row["precision"], convolutions=row["kind"] in CONVOLUTION_KINDS)
        assert 0 <= row["steady_spread"] <= 0.01 * row["measured"] + scratch, row
        assert row["measured"] >= row["first_step"] > row["after_setup"] > 0, row
        # the allocator sees every storage the dispatch tracker sees, and kernel scratch besides
        assert row["measured"] >= row["measured_tensors"], row
        # ZeRO-0 fp32 holds at least parameters, gradients and Adam's two states: 16 bytes per trainable parameter
        if row["stage"] == "0" and row["precision"] == "32-true":
            assert row["measured"] >= 16 * row["trainable"], row


@pytest.mark.distributed
@pytest.mark.slow  # about 1.5 minutes: `make test-slow`, which CI runs
def test_quick_subset_errors_within_the_claim(quick: dict) -> None:
    """The claim against the counting allocator: median |error| <= MEDIAN_PCT; every peak over by at most WORST_PCT
    and under by at most that plus the kernels' scratch allowance (bf16 matmuls, convolutions); no refusal, no crash;
    from the module for every kind, from the config alone for the Hugging Face kinds."""
    rows = quick["rows"]
    for method, kinds in (("module", set(KINDS)), ("config", set(CONFIG_ONLY))):
        assert not [r for r in rows if r.get(f"{method}_failed")], method  # no refusal, no crash
        judged = [r for r in rows if r[method] is not None]
        assert {r["kind"] for r in judged} == kinds
        errors = [100.0 * (r[method] - r["measured"]) / r["measured"] for r in judged]
        assert statistics.median(map(abs, errors)) <= MEDIAN_PCT, (method, sorted(errors))
        outside = [(r["kind"], r["stage"], r["precision"], r["rank"], f"{e:+.3f} %") for r, e in zip(judged, errors)
                   if not within_claim(r[method], r["measured"], r["precision"], r["kind"] in CONVOLUTION_KINDS)]
        assert not outside, (method, WORST_PCT, outside)
        # an fp32 run without convolutions takes no scratch worth the name: there the claim is WORST_PCT both ways
        fp32 = [abs(e) for r, e in zip(judged, errors) if r["precision"] == "32-true" and r["kind"] != "cnn"]
        assert fp32 and max(fp32) <= WORST_PCT, (method, fp32)
