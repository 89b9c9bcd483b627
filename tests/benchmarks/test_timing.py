"""benchmarks/_timing.py: the zero protocol's statistics (a paired ratio of step times over interleaved rounds, its
95 % interval and the verdict), and gpu_speed.py's analysis of zero fits, on made-up step times (no fit runs)."""

import doctest
import random
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import _timing  # benchmarks/ is put on the path above
import gpu_speed
from _timing import RatioEstimate, balanced_orders, paired_ratio, verdict


def _rounds(median: float, noise: float, rounds: int = 4, steps: int = 30, seed: int = 0, drift: float = 0.0):
    """Step times of one side: ``rounds`` fits of ``steps`` steps, Gaussian noise (relative), a drift per round."""
    rng = random.Random(seed)
    return [[median * (1 + drift * r) * (1 + rng.gauss(0, noise)) for _ in range(steps)] for r in range(rounds)]


def test_the_doctests_run():
    assert doctest.testmod(_timing).failed == 0


def test_identical_constant_samples_give_a_zero_width_interval():
    steps = [[0.12] * 30] * 4
    estimate = paired_ratio(steps, steps)
    assert (estimate.ratio, estimate.low, estimate.high, estimate.half_width) == (1.0, 1.0, 1.0, 0.0)
    assert verdict(estimate) == ("within 2 %", True)


def test_a_known_5_percent_shift_is_detected_through_noise_and_drift():
    """1 % step noise, 30 steps, 4 rounds, the GPU getting 1 % slower each round (both sides alike)."""
    a = _rounds(0.105, 0.01, seed=1, drift=0.01)
    b = _rounds(0.100, 0.01, seed=2, drift=0.01)
    estimate = paired_ratio(a, b)
    assert estimate.low < 1.05 < estimate.high and estimate.half_width < 0.01
    text, passed = verdict(estimate)
    assert text.startswith("slower by 5.") and passed is False


def test_the_same_speed_is_judged_within_2_percent():
    estimate = paired_ratio(_rounds(0.1, 0.01, seed=3), _rounds(0.1, 0.01, seed=4))
    assert estimate.low < 1 < estimate.high
    assert verdict(estimate) == ("within 2 %", True)


def test_noisy_steps_or_one_round_leave_it_undecided():
    """5 % step noise over 30 steps: each median is uncertain by ~1.1 %, too much to judge 2 %."""
    text, passed = verdict(paired_ratio(_rounds(0.105, 0.05, seed=5), _rounds(0.1, 0.05, seed=6)))
    assert text.startswith("undecided: CI half-width") and text.endswith("> 1 %") and passed is None
    one = paired_ratio([[0.1] * 30], [[0.1] * 30])
    assert one.rounds == 1 and verdict(one) == ("undecided: 1 round (the fit-to-fit spread needs >= 2)", None)


def test_rounds_that_disagree_widen_the_interval_beyond_the_steps_noise():
    """Student's t over the rounds: fits that differ from round to round (not within a fit) are seen."""
    a = [[0.1 * f] * 30 for f in (1.00, 1.04, 0.98, 1.03)]
    b = [[0.1] * 30] * 4
    estimate = paired_ratio(a, b)
    assert "Student's t over 4 rounds" in estimate.method
    assert estimate.half_width > 0.02 and verdict(estimate)[1] is None


def test_an_interval_that_holds_the_line_is_undecided():
    assert verdict(RatioEstimate(1.02, 1.012, 1.028, 6, (1.02,) * 6, "")) == (
        "undecided: CI [1.012, 1.028] contains 1.02",
        None,
    )


def test_bad_input_is_refused_with_what_was_expected():
    with pytest.raises(ValueError, match="same number"):
        paired_ratio([[0.1]], [[0.1], [0.1]])
    with pytest.raises(ValueError, match="all > 0"):
        paired_ratio([[0.1, 0.0]], [[0.1]])


def test_balanced_orders_reverse_every_other_round():
    orders = balanced_orders(["memopt", "lightning", "lightning+es"], 3)
    assert orders[1] == orders[0][::-1] and orders[2] == orders[0]


def _fit(arm: str, stage: int, r: int, steps: list[float], clean: bool = True) -> dict:
    """A zero fit's record as ``gpu_speed.zero_fit`` writes it (the fields the analysis reads)."""
    return {"name": f"r{r} {arm}:{stage}", "status": "ok", "arm": arm, "stage": stage, "round": r, "clean": clean,
            "allocator_as_planned": True, "expandable_segments": arm != "lightning", "step_times_s": steps,
            **gpu_speed.spread(steps), "drift": 0.0, "net_peak_allocated_bytes": 2**30,
            "peak_reserved_bytes": 2**31}  # fmt: skip


def test_gpu_speed_judges_zero_fits_and_leaves_unclean_rounds_out(monkeypatch):
    """gpu_speed.py's analysis: MemOpt 5 % slower than Lightning, as fast as Lightning with expandable segments (the
    allocator's effect); a round with an unclean fit is left out of every comparison it is in."""
    units = [{"name": "env", "status": "ok"}]
    for r in range(1, 5):
        units += [_fit("memopt", 1, r, _rounds(0.105, 0.005, 1, seed=r)[0]),
                  _fit("lightning", 1, r, _rounds(0.1, 0.005, 1, seed=9 + r)[0]),
                  _fit("lightning+es", 1, r, _rounds(0.105, 0.005, 1, seed=19 + r)[0])]  # fmt: skip
    units.append(_fit("lightning", 1, 5, [0.2] * 30, clean=False))
    units.append(_fit("memopt", 1, 5, [0.1] * 30))
    results = {"zero": {"part": "zero", "status": "ok", "units": units}}
    comparisons = {c["b"] + "/" + c["a"]: c for c in gpu_speed.zero_comparisons(results)}
    users = comparisons["lightning/memopt"]
    assert users["rounds"] == 4 and users["rounds_left_out"] == 1 and "ratio_all_rounds" in users
    assert users["verdict"].startswith("slower by ") and users["pass"] is False
    assert users["ratio"] == pytest.approx(1.05, abs=0.005) and users["low"] > 1.02
    same = comparisons["lightning+es/memopt"]
    assert same["rounds_left_out"] == 0 and same["verdict"] == "within 2 %" and same["pass"] is True
    allocator = comparisons["lightning/lightning+es"]
    assert allocator["verdict"].startswith("slower by ") and allocator["ratio"] == pytest.approx(1.05, abs=0.005)
    monkeypatch.setattr(gpu_speed, "STAGES", (1,))
    goals = {g["target"]: g for g in gpu_speed.targets(results, list(comparisons.values()))}
    goal = goals["ZeRO-1: MemOptStrategy / DeepSpeedStrategy step time"]
    assert goal["pass"] is False and goal["ci"][0] > 1.02 and goal["rounds"] == 4
    assert goals["ZeRO-1: MemOptStrategy / DeepSpeedStrategy peak allocated (median over rounds)"]["value"] == 1.0
    text = gpu_speed.tables(results, list(goals.values()), list(comparisons.values()))
    row = next(line for line in text.splitlines() if line.startswith("| 1 | MemOptStrategy / DeepSpeedStrategy |"))
    assert f"| {users['ratio']:.3f} |" in row and "| 4 |" in row and row.endswith(f"| {users['verdict']} |")
