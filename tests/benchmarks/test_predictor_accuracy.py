"""The predictor against real runs: ``benchmarks/predictor_accuracy.py --quick``.

The quick subset (``QUICK`` in the script) holds every model kind and every value of every axis (single device and
``MemOptStrategy`` ZeRO 0-3, fp32 and bf16-mixed, eager and SDPA, checkpointing off and on, gradient accumulation,
offload of the optimizer and of the parameters, 2 and 4 ranks; fp16, which does not train on CPU, recorded as skipped):
the single-device configurations run in the test's subprocess, the 2-rank ones in one 2-process launch (gloo), the
4-rank one in a 4-process launch of its own. Each rank's steady-state
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
from accuracy_report import CONVOLUTION_KINDS, describe, rows_of  # noqa: E402
from accuracy_targets import MEDIAN_PCT, WORST_PCT, scratch_allowance, within_claim  # noqa: E402
from predictor_accuracy import QUICK, configurations, parse_args, skip_reason  # noqa: E402


def _axes(cfg: dict) -> tuple:
    return (cfg["kind"], cfg["stage"], cfg["offload"], cfg["accumulate"], cfg["world_size"])


def test_new_axes_are_selected_by_their_flags() -> None:
    """Accumulation and offload multiply the matrix; offload only where MemOptStrategy offers it (the optimizer at
    ZeRO >= 1, the parameters at ZeRO 3); each world size adds the ZeRO configurations once, single device once."""
    args = parse_args(["--kinds", "llama", "--stages", "single,0,1,3", "--precisions", "bf16-mixed", "--attention",
                       "sdpa", "--checkpointing", "off", "--accumulate", "1,2", "--offload",
                       "none,optimizer,optimizer+parameters", "--world-sizes", "2,4"])  # fmt: skip
    got = sorted(_axes(cfg) for cfg in configurations(args))
    expected = [("llama", "single", "none", acc, 1) for acc in (1, 2)]
    for stage, offloads in (("0", ["none"]), ("1", ["none", "optimizer"]),
                            ("3", ["none", "optimizer", "optimizer+parameters"])):  # fmt: skip
        expected += [("llama", stage, off, acc, ws) for off in offloads for acc in (1, 2) for ws in (2, 4)]
    assert got == sorted(expected)
    assert [cfg["index"] for cfg in configurations(args)] == list(range(len(expected)))


def test_defaults_keep_the_measured_matrix_and_record_fp16_as_skipped() -> None:
    """By default: no accumulation, no offload, 2 ranks; fp16 configurations are listed, not run on CPU."""
    configs = configurations(parse_args([]))
    runs = [cfg for cfg in configs if cfg["runs_on_cpu"]]
    assert len(runs) == 412
    assert {(cfg["accumulate"], cfg["offload"]) for cfg in configs} == {(1, "none")}
    assert {cfg["world_size"] for cfg in configs} == {1, 2}
    assert {cfg["precision"] for cfg in configs if not cfg["runs_on_cpu"]} == {"16-mixed"}
    assert all(cfg["precision"] != "16-mixed" for cfg in runs)


@pytest.mark.parametrize(
    "flag, value",
    [("--accumulate", "0"), ("--accumulate", "two"), ("--offload", "parameters"), ("--world-sizes", "3"),
     ("--precisions", "16-true")],
)  # fmt: skip
def test_a_bad_axis_value_is_refused_with_the_allowed_ones(flag: str, value: str) -> None:
    with pytest.raises(SystemExit, match=f"Expected {flag}.*got '{value}'. Fix:"):
        configurations(parse_args([flag, value]))


def test_quick_holds_one_configuration_of_each_new_axis() -> None:
    configs = configurations(parse_args(["--quick"]))
    assert len(configs) == len(QUICK)
    assert any(cfg["accumulate"] > 1 for cfg in configs)
    assert {cfg["offload"] for cfg in configs} == {"none", "optimizer", "optimizer+parameters"}
    assert {cfg["world_size"] for cfg in configs} == {1, 2, 4}
    assert [cfg["precision"] for cfg in configs if not cfg["runs_on_cpu"]] == ["16-mixed"]
    # the single-device configurations come first: they run before any launch
    stages = [cfg["stage"] for cfg in configs]
    assert stages == sorted(stages, key=lambda s: s != "single")


def test_fp16_is_skipped_with_the_reason_the_real_component_gives() -> None:
    zero = skip_reason({"stage": "1", "precision": "16-mixed"})
    assert zero.startswith("MemOptStrategy refuses it on CPU: Expected a precision DeepSpeed can run on CPU")
    assert "fp16 needs a GPU" in zero
    single = skip_reason({"stage": "single", "precision": "16-mixed"})
    assert "trains in 'bf16-mixed', not fp16" in single  # Lightning swaps the precision on CPU


def test_with_accumulation_a_step_is_the_highest_of_its_micro_steps() -> None:
    """The steady state is per optimizer step: the first window (Adam states created) is left out, and each later
    window's peak is its highest micro-step's."""

    def micro(peak: int) -> dict:
        return {"allocations_peak": peak, "tensors_peak": peak - 10, "allocations_end": 0, "tensors_end": 0}

    result = {"index": 0, "kind": "llama", "stage": "2", "world_size": 2, "precision": "32-true", "attention": "sdpa",
              "checkpointing": False, "accumulate": 2, "offload": "none", "rank": 0, "failed": None,
              "after_setup": 50, "steps": [micro(p) for p in (100, 400, 300, 500, 320, 510)]}  # fmt: skip
    prediction = {"module": {"total": 510, "per_rank": {0: 505}, "peak_phase": "step", "seconds": 0.0}}
    (row,) = rows_of([result], {0: prediction}, ("module",))
    assert (row["measured"], row["steady_spread"], row["first_step"]) == (510, 10, 100)
    assert row["module"] == 505 and row["module_within_claim"]
    assert describe(row).endswith("acc2")
    # an accumulation window left unfinished does not count
    (short,) = rows_of([{**result, "steps": result["steps"][:3]}], {0: prediction}, ("module",))
    assert (short["run_failed"], short["measured"]) == ("1 optimizer step(s) recorded, 2 needed", None)


#: a row's identity across two runs of the subset
_ROW_KEY = ("kind", "stage", "precision", "attention", "checkpointing", "accumulate", "offload", "world_size", "rank")


def _suspect(row: dict) -> bool:
    """A peak of a gloo launch that the race can move (``docs/predictor.md``, Accuracy: gloo's worker thread lets a
    collective's tensor go a moment after the collective returns, and a rank that allocates before that holds both):
    unsteady across the steady steps, or outside the claim from the module or the config."""
    if row["world_size"] < 2 or row.get("measured") is None:
        return False
    scratch = scratch_allowance(row["precision"], convolutions=row["kind"] in CONVOLUTION_KINDS)
    if row["steady_spread"] > 0.01 * row["measured"] + scratch:
        return True
    return any(row.get(m) is not None and not within_claim(row[m], row["measured"], row["precision"],
                                                           row["kind"] in CONVOLUTION_KINDS)
               for m in ("module", "config"))  # fmt: skip


def remeasured(first: dict, second: "dict | None") -> dict:
    """``first`` with each suspect row of a gloo launch (:func:`_suspect`) replaced by the same configuration's row of
    ``second``, a run of its own: the re-take stands, whatever it says. A miss of the predictor is in both runs; the
    race is in one or the other. ``remeasured`` lists the rows replaced."""
    suspects = [r for r in first["rows"] if _suspect(r)]
    if not suspects or second is None:
        return {**first, "remeasured": []}
    again = {tuple(r[k] for k in _ROW_KEY): r for r in second["rows"]}
    keys = {tuple(r[k] for k in _ROW_KEY) for r in suspects}
    rows = [again.get(tuple(r[k] for k in _ROW_KEY), r) if tuple(r[k] for k in _ROW_KEY) in keys else r
            for r in first["rows"]]  # fmt: skip
    return {**first, "rows": rows, "remeasured": sorted(keys, key=str)}


def test_a_suspect_row_of_a_launch_is_measured_again_once_and_the_retake_stands() -> None:
    def row(rank: int, measured: int, spread: int = 0, world_size: int = 2) -> dict:
        return {"kind": "plain", "stage": "2", "precision": "32-true", "attention": "sdpa", "checkpointing": True,
                "accumulate": 1, "offload": "none", "world_size": world_size, "rank": rank, "measured": measured,
                "steady_spread": spread, "module": 1000, "config": None}  # fmt: skip

    first = {"rows": [row(0, 1016), row(1, 1000), row(0, 1100, world_size=1)]}  # rank 0 1.6 % over the prediction
    retake = {"rows": [row(0, 1020), row(1, 1002)]}  # the predictor misses again: the re-take stands and fails
    merged = remeasured(first, retake)
    assert [r["measured"] for r in merged["rows"]] == [1020, 1000, 1100]  # a single-device row is never re-taken
    assert merged["remeasured"] == [("plain", "2", "32-true", "sdpa", True, 1, "none", 2, 0)]
    assert remeasured({"rows": [row(1, 1000, spread=30)]}, {"rows": [row(1, 1001)]})["rows"][0]["measured"] == 1001
    assert remeasured({"rows": [row(1, 1000)]}, None)["remeasured"] == []


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The quick subset; a suspect row of a gloo launch is measured again once (:func:`remeasured`)."""
    folder = tmp_path_factory.mktemp("predictor_accuracy")
    run_script(SCRIPT, "--quick", "--out", str(folder / "quick.json"), timeout=600)
    first = json.loads((folder / "quick.json").read_text())
    if not any(_suspect(r) for r in first["rows"]):
        return remeasured(first, None)
    run_script(SCRIPT, "--quick", "--out", str(folder / "again.json"), timeout=600)
    return remeasured(first, json.loads((folder / "again.json").read_text()))


@pytest.mark.distributed
@pytest.mark.slow  # 204 s at load average 6-9 (2026-12-04; the 4-rank fit 32 s): `make test-slow`, CI
def test_quick_subset_measures_every_kind_and_axis(quick: dict) -> None:
    rows = quick["rows"]
    assert quick["configurations"] == len(QUICK)
    assert quick["failed_runs"] == []
    assert [(s["kind"], s["stage"], s["precision"]) for s in quick["skipped"]] == [("llama", "1", "16-mixed")]
    assert "fp16 needs a GPU" in quick["skipped"][0]["reason"]
    assert {r["accumulate"] for r in rows} == {1, 2}
    assert {r["offload"] for r in rows} == {"none", "optimizer", "optimizer+parameters"}
    assert {r["world_size"] for r in rows} == {1, 2, 4}
    assert {r["kind"] for r in rows} == set(KINDS)
    assert {r["stage"] for r in rows} == {"single", "0", "1", "2", "3"}
    assert {r["precision"] for r in rows} == {"32-true", "bf16-mixed"}  # 16-mixed: skipped above
    assert {r["attention"] for r in rows} == {"eager", "sdpa", None}  # None: the CNN has no attention
    assert {r["checkpointing"] for r in rows} == {False, True}
    # every configuration measured on each of its ranks: the single-device ones once, the ZeRO ones on 2 ranks
    ranks = {}
    for r in rows:
        key = (r["kind"], r["stage"], r["precision"], r["attention"], r["checkpointing"], r["accumulate"],
               r["offload"], r["world_size"])  # fmt: skip
        ranks.setdefault(key, []).append(r["rank"])
    assert len(ranks) == len(QUICK) - len(quick["skipped"])
    for key, seen in ranks.items():
        assert sorted(seen) == list(range(key[-1])), key
    for row in rows:
        # predicted with the settings the run really had (stage, resolved buckets, precision, checkpointing, ...)
        assert row["settings_match"], row["settings_diff"]
        # the steady state is steady (steps 2..3 peak alike, up to the kernels' scratch, which the allocator sees and
        # which varies from step to step: 131 KB once for a bf16 SDPA row) and the step adds to what setup left
        scratch = scratch_allowance(row["precision"], convolutions=row["kind"] in CONVOLUTION_KINDS)
        assert 0 <= row["steady_spread"] <= 0.01 * row["measured"] + scratch, row
        assert row["measured"] >= row["first_step"] > row["after_setup"] > 0, row
        # the allocator sees every storage the dispatch tracker sees, and kernel scratch besides (up to a few bytes:
        # the ZeRO-2 accumulation row's tracker peak was 12 B above the allocator's, 2026-12-04)
        assert row["measured"] >= row["measured_tensors"] - 64, row
        # ZeRO-0 fp32 holds at least parameters, gradients and Adam's two states: 16 bytes per trainable parameter
        if row["stage"] == "0" and row["precision"] == "32-true":
            assert row["measured"] >= 16 * row["trainable"], row


@pytest.mark.distributed
@pytest.mark.slow  # shares the run above: `make test-slow`, which CI runs
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
