"""Statistics of a step-time comparison run in interleaved rounds (``gpu_speed.py``'s ``zero`` protocol).

Pure Python (no torch), so that the parent process and the tests use it without a GPU. A round holds one fit of each
side, close together in time; its ratio is ``median(A's timed steps) / median(B's timed steps)``. The estimate is the
geometric mean of the rounds' ratios, and its 95 % confidence interval is the wider, at each end, of two:

- Student's t over the rounds' log-ratios. Each round's ratio carries both the fit-to-fit spread and the noise of
  its two medians, so this interval holds both; with few rounds it is wide, as it should be (t(0.975, 3) = 3.18).
- A bootstrap of the steps within each fit, the rounds kept as they are (the second stage of a two-stage sample,
  Davison & Hinkley 1997, *Bootstrap Methods and their Application*, section 3.8): the noise of the medians alone,
  a floor for when a few rounds agree by chance.

The verdict asks for precision first: a half-width above ``precision`` (1 % to judge a 2 % tolerance) is undecided.
"""

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

#: t(0.975, df) for df = 1..30 (two-sided 95 %); above 30, 1.96 + 2.4 / df is within 0.002 of it
# fmt: off
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
# fmt: on


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (a 95 % two-sided interval).

    Example:
        >>> t_quantile_975(3), t_quantile_975(1000)
        (3.182, 1.9624)
    """
    if df < 1:
        raise ValueError(f"Expected at least 1 degree of freedom, got {df}.")
    return _T975[df - 1] if df <= len(_T975) else round(1.96 + 2.4 / df, 4)


def balanced_orders(items: Sequence, rounds: int) -> "list[list]":
    """The order of ``items`` in each round: as given, then reversed, and so on (A B C, C B A, ...), so that a drift
    linear in time weighs on every item alike over each pair of rounds.

    Example:
        >>> balanced_orders("AB", 4)
        [['A', 'B'], ['B', 'A'], ['A', 'B'], ['B', 'A']]
    """
    return [list(items) if r % 2 == 0 else list(items)[::-1] for r in range(rounds)]


@dataclass(frozen=True)
class RatioEstimate:
    """A step-time ratio A / B over paired rounds, with its 95 % confidence interval.

    Attributes:
        ratio: the geometric mean of the rounds' ratios of medians.
        low: the interval's lower end.
        high: the interval's upper end.
        rounds: the number of paired rounds.
        per_round: each round's ratio of medians, in round order.
        method: how the interval was made.
    """

    ratio: float
    low: float
    high: float
    rounds: int
    per_round: "tuple[float, ...]"
    method: str

    @property
    def half_width(self) -> float:
        """Half the interval's width, in units of the ratio (0.01: plus or minus 1 %)."""
        return (self.high - self.low) / 2

    def to_dict(self) -> dict:
        """The fields and the half-width, for JSON."""
        return {**asdict(self), "per_round": list(self.per_round), "half_width": self.half_width}


def _check(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> None:
    if len(a) != len(b) or not a:
        raise ValueError(f"Expected the same number (>= 1) of rounds on both sides, got {len(a)} and {len(b)}.")
    for side in (a, b):
        for steps in side:
            if not steps or min(steps) <= 0:
                raise ValueError(f"Expected each fit's step times, all > 0, got {list(steps)[:5]}.")


def paired_ratio(
    a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], resamples: int = 2000, seed: int = 0
) -> RatioEstimate:
    """The ratio of step times A / B from paired rounds (``a[r]``, ``b[r]``: the timed steps of each side's fit in
    round ``r``), with the wider, at each end, of Student's t interval over the rounds and a bootstrap of the steps
    within the fits.

    Example:
        >>> same = paired_ratio([[0.1, 0.1, 0.1]] * 3, [[0.1, 0.1, 0.1]] * 3)
        >>> same.ratio, same.half_width
        (1.0, 0.0)
        >>> slower = paired_ratio([[0.105, 0.105, 0.105]] * 4, [[0.1, 0.1, 0.1]] * 4)
        >>> round(slower.ratio, 6), slower.rounds, verdict(slower)
        (1.05, 4, ('slower by 5.0 %', False))
    """
    _check(a, b)
    per_round = [statistics.median(x) / statistics.median(y) for x, y in zip(a, b)]
    logs = [math.log(r) for r in per_round]
    center = statistics.fmean(logs)
    rng = random.Random(seed)
    boot = sorted(
        statistics.fmean(
            math.log(statistics.median(rng.choices(x, k=len(x))) / statistics.median(rng.choices(y, k=len(y))))
            for x, y in zip(a, b)
        )
        for _ in range(resamples)
    )
    low, high = boot[int(0.025 * (resamples - 1))], boot[math.ceil(0.975 * (resamples - 1))]
    method = f"bootstrap of the steps within the fits ({resamples} resamples)"
    if len(a) >= 2:
        margin = t_quantile_975(len(a) - 1) * statistics.stdev(logs) / math.sqrt(len(a))
        low, high = min(low, center - margin), max(high, center + margin)
        method = f"wider of Student's t over {len(a)} rounds and a {method}"
    return RatioEstimate(math.exp(center), math.exp(low), math.exp(high), len(a), tuple(per_round), method)


def verdict(estimate: RatioEstimate, tolerance: float = 0.02, precision: float = 0.01) -> "tuple[str, bool | None]":
    """Judge ``ratio <= 1 + tolerance``: (what to print, met or not; ``None``: undecided).

    Undecided with fewer than 2 rounds (the fit-to-fit spread is unseen), with a half-width above ``precision``, or
    when the interval contains ``1 + tolerance``.

    Example:
        >>> verdict(RatioEstimate(1.05, 1.045, 1.055, 4, (1.05,) * 4, ""))
        ('slower by 5.0 %', False)
        >>> verdict(RatioEstimate(1.0, 0.995, 1.005, 4, (1.0,) * 4, ""))
        ('within 2 %', True)
        >>> verdict(RatioEstimate(1.0, 0.97, 1.03, 4, (1.0,) * 4, ""))
        ('undecided: CI half-width 3.0 % > 1 %', None)
    """
    line = 1 + tolerance
    if estimate.rounds < 2:
        return f"undecided: {estimate.rounds} round (the fit-to-fit spread needs >= 2)", None
    if estimate.half_width > precision:
        width = f"{100 * estimate.half_width:{'.1f' if estimate.half_width < 10 else '.3g'}}"
        return f"undecided: CI half-width {width} % > {100 * precision:g} %", None
    if estimate.high <= line:
        faster = f" (faster by {100 * (1 - estimate.ratio):.1f} %)" if estimate.high < 1 else ""
        return f"within {100 * tolerance:g} %{faster}", True
    if estimate.low > line:
        return f"slower by {100 * (estimate.ratio - 1):.1f} %", False
    return f"undecided: CI [{estimate.low:.3f}, {estimate.high:.3f}] contains {line:g}", None
