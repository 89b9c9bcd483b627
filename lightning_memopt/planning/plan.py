"""Batch planning: the largest micro-batch that fits and the accumulation for a global batch (the one search;
:mod:`.suggest` ranks fixes with it).

The lecture's recipe (section 3): memory depends only on the micro-batch, optimisation quality on the
global batch in tokens, ``micro_batch x seq_len x accumulate_grad_batches x world_size``; so find the largest
micro-batch that fits first, then reach the global batch with gradient accumulation. :func:`plan_batch` does
it over the settings that trade speed for memory, cheapest first, using
:func:`~lightning_memopt.planning.estimate_memory` (monotone in the micro-batch, so a binary search
finds the largest one that fits).

Cost order of the settings (cheapest first), from what each adds to a step:

1. ZeRO stage 0, 1, 2, 3 without checkpointing: stages 1-2 communicate as much as DDP, stage 3 1.5x
   (Rajbhandari et al. 2020, section 7); a lower stage is cheaper.
2. The same stages with activation checkpointing: one more forward per step, ~30 % more compute
   (lecture section 2; Chen et al. 2016).
3. Optimizer offload to CPU (ZeRO 1-3, with and without checkpointing): the optimizer step runs on the
   CPU and gradients cross PCIe every step (ZeRO-Offload, Ren et al. 2021).
4. Parameter offload (ZeRO-3 only) with optimizer offload: parameters cross PCIe twice per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lightning_memopt.core.units import format_bytes, parse_bytes
from lightning_memopt.predictor.report.estimate import MemoryEstimate

__all__ = ["NoFitError", "Plan", "Setting", "plan_batch"]

_SEARCHED = ("zero", "activation_checkpointing", "offload_optimizer", "offload_parameters", "micro_batch_size",
             "accumulate_grad_batches")


class NoFitError(ValueError):
    """No setting fits in the device memory; the message names the smallest predicted one."""


@dataclass(frozen=True)
class Setting:
    """One point of the search space (ZeRO stage, checkpointing, offload).

    Example:
        >>> Setting(zero=3, activation_checkpointing=True, offload_optimizer=True).describe()
        'zero=3 + checkpointing + offload optimizer'
    """

    zero: int = 0
    activation_checkpointing: bool = False
    offload_optimizer: bool = False
    offload_parameters: bool = False

    def describe(self) -> str:
        """A short human-readable name."""
        parts = [f"zero={self.zero}"]
        parts += ["checkpointing"] if self.activation_checkpointing else []
        parts += ["offload optimizer"] if self.offload_optimizer else []
        parts += ["offload parameters"] if self.offload_parameters else []
        return " + ".join(parts)

    def kwargs(self, offload_device: "str | bool" = True) -> "dict[str, Any]":
        """The ``estimate_memory`` keyword arguments of this setting."""
        return {
            "zero": self.zero,
            "activation_checkpointing": self.activation_checkpointing,
            "offload_optimizer": offload_device if self.offload_optimizer else False,
            "offload_parameters": offload_device if self.offload_parameters else False,
        }


def _settings(zero_stages: "tuple[int, ...]", checkpointing: bool, offload: bool) -> "list[Setting]":
    """The search space in cost order (see the module docstring)."""
    ckpt = (False, True) if checkpointing else (False,)
    out = [Setting(z, c) for c in ckpt for z in zero_stages]
    if offload:
        out += [Setting(z, c, offload_optimizer=True) for c in ckpt for z in zero_stages if z >= 1]
        out += [Setting(3, c, True, True) for c in ckpt if 3 in zero_stages]
    return out


@dataclass(frozen=True)
class Plan:
    """The planner's answer: a setting, a micro-batch and the gradient accumulation for the global batch.

    Attributes:
        setting: the cheapest setting that fits (ZeRO stage, checkpointing, offload).
        max_micro_batch_size: the largest micro-batch that fits with the margin (capped at the micro-batch
            that reaches the global batch with no accumulation).
        micro_batch_size: the micro-batch to use: the smallest one that needs no more accumulation steps
            than ``max_micro_batch_size`` (same number of steps, least overshoot of the global batch).
        accumulate_grad_batches: gradient-accumulation steps (Lightning's ``accumulate_grad_batches``).
        global_batch_tokens: the requested global batch, in tokens.
        achieved_global_batch_tokens: ``micro_batch_size * seq_len * accumulate_grad_batches * world_size``.
        world_size: data-parallel ranks.
        seq_len: tokens per sequence.
        device_memory: bytes of one device.
        margin: fraction of the device kept free.
        estimate: the per-rank estimate at ``micro_batch_size``.
        tried: ``(setting description, predicted total at micro-batch 1)`` for every setting tried.
    """

    setting: Setting
    max_micro_batch_size: int
    micro_batch_size: int
    accumulate_grad_batches: int
    global_batch_tokens: int
    achieved_global_batch_tokens: int
    world_size: int
    seq_len: int
    device_memory: int
    margin: float
    estimate: MemoryEstimate
    tried: "tuple[tuple[str, int], ...]" = field(default=())

    @property
    def budget(self) -> int:
        """Bytes the estimate may use: ``device_memory * (1 - margin)``."""
        return int(self.device_memory * (1.0 - self.margin))

    def to_dict(self) -> "dict[str, Any]":
        """A JSON-serialisable dict (bytes as ints)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("setting", "estimate", "tried")}
        out.update(self.setting.kwargs(), setting=self.setting.describe(), budget=self.budget)
        out["estimate"] = self.estimate.to_dict()
        out["tried"] = [list(t) for t in self.tried]
        return out

    def table(self, unit: str = "GiB") -> str:
        """The plan as a two-column table, then the estimate's breakdown."""
        rows = [
            ("setting", self.setting.describe()),
            ("micro-batch (largest that fits)", str(self.max_micro_batch_size)),
            ("micro-batch (used)", str(self.micro_batch_size)),
            ("accumulate_grad_batches", str(self.accumulate_grad_batches)),
            ("world size x seq len", f"{self.world_size} x {self.seq_len}"),
            ("global batch (requested)", f"{self.global_batch_tokens:,} tokens"),
            ("global batch (achieved)", f"{self.achieved_global_batch_tokens:,} tokens"),
            ("predicted peak per rank", format_bytes(self.estimate.total, unit)),
            ("budget (device - margin)", f"{format_bytes(self.budget, unit)} ({self.margin:.0%} kept free)"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}} | {v}" for k, v in rows]
        return "\n".join([*lines, "", self.estimate.table(unit)])


def _check_margin(margin: float) -> None:
    if not isinstance(margin, (int, float)) or not 0.0 <= margin < 1.0:
        raise ValueError(f"Expected `margin` in [0, 1), got {margin!r}. Fix: e.g. margin=0.1 keeps 10 % free.")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}.")
    return value


def largest_fitting(estimate: Any, budget: int, upper: int) -> "tuple[int, MemoryEstimate, int]":
    """Binary search of the largest micro-batch in [1, upper] that fits ``budget``.

    The estimate is monotone below ``upper``; ``upper`` itself is tried first, since there it may be lower
    (the global batch needs no gradient accumulation, which keeps gradients between micro-steps).

    Args:
        estimate: micro-batch -> its :class:`MemoryEstimate` (anything with a ``total``).
        budget: bytes the peak must not exceed.
        upper: the largest micro-batch to consider.

    Returns ``(largest, its estimate, predicted total at micro-batch 1)``; ``largest`` is 0 when even
    micro-batch 1 does not fit (the estimate is then micro-batch 1's).

    Example:
        >>> from types import SimpleNamespace
        >>> largest_fitting(lambda b: SimpleNamespace(total=10 * b), budget=35, upper=8)[0]
        3
    """
    first = estimate(1)
    if _budgeted(first) > budget:
        return 0, first, _budgeted(first)
    if upper > 1:
        top = estimate(upper)
        if _budgeted(top) <= budget:
            return upper, top, _budgeted(first)
        upper -= 1
    lo, hi, best = 1, upper, first
    while lo < hi:
        mid = (lo + hi + 1) // 2
        est = estimate(mid)
        if _budgeted(est) <= budget:
            lo, best = mid, est
        else:
            hi = mid - 1
    return lo, best, first.total


def plan_batch(
    model: Any,
    *,
    device_memory: "int | float | str",
    world_size: int,
    seq_len: int,
    global_batch_tokens: "int | float",
    margin: float = 0.1,
    zero_stages: "tuple[int, ...]" = (0, 1, 2, 3),
    checkpointing: bool = True,
    offload: bool = True,
    offload_device: str = "cpu",
    **estimate_kwargs: Any,
) -> Plan:
    """Find the cheapest setting that fits, its largest micro-batch, and the accumulation for the global batch.

    Args:
        model: anything ``estimate_memory`` accepts (preset, config, module, parameter count).
        device_memory: one device's memory (bytes or ``"80GiB"``).
        world_size: data-parallel ranks.
        seq_len: tokens per sequence.
        global_batch_tokens: the target global batch in tokens (``4e6``); the achieved one is >= it.
        margin: fraction of the device kept free, in [0, 1).
        zero_stages: ZeRO stages to consider.
        checkpointing: whether activation checkpointing may be turned on.
        offload: whether optimizer / parameter offload may be turned on.
        offload_device: ``"cpu"`` or ``"nvme"``, passed to ``estimate_memory`` when offloading.
        **estimate_kwargs: the other ``estimate_memory`` arguments (precision, optimizer, attention, liger,
            engine, ...). The searched ones (zero, checkpointing, offload, micro-batch, accumulation) are not
            accepted.

    Raises:
        NoFitError: when no setting fits at micro-batch 1; the message names the smallest prediction.

    Example:
        >>> plan = plan_batch("gpt2", device_memory="24GiB", world_size=2, seq_len=1024, global_batch_tokens=5e5)
        >>> plan.achieved_global_batch_tokens >= 500_000 and plan.estimate.fits("24GiB", margin=0.1)
        True
    """
    from lightning_memopt.planning.estimate import estimate_memory

    searched = sorted(set(estimate_kwargs) & set(_SEARCHED))
    if searched:
        raise TypeError(
            f"plan_batch searches {', '.join(searched)} itself, got them as arguments."
            " Fix: restrict the search with zero_stages=, checkpointing= or offload= instead."
        )
    _check_margin(margin)
    world_size = _positive_int("world_size", world_size)
    seq_len = _positive_int("seq_len", seq_len)
    target = _positive_int("global_batch_tokens", global_batch_tokens)
    if not zero_stages or any(z not in (0, 1, 2, 3) for z in zero_stages):
        raise ValueError(f"Expected `zero_stages` to be a non-empty subset of (0, 1, 2, 3), got {zero_stages!r}.")
    device = parse_bytes(device_memory)
    budget = int(device * (1.0 - margin))
    cap = max(1, math.ceil(target / (seq_len * world_size)))  # beyond this, no accumulation is needed anyway

    tried: "list[tuple[str, int]]" = []
    for setting in _settings(tuple(sorted(zero_stages)), checkpointing, offload):
        kwargs = dict(estimate_kwargs, world_size=world_size, seq_len=seq_len, **setting.kwargs(offload_device))

        def estimate(micro: int, kwargs: "dict[str, Any]" = kwargs) -> MemoryEstimate:
            accumulate = math.ceil(target / (micro * seq_len * world_size))  # the accumulation it needs
            return estimate_memory(model, micro_batch_size=micro, accumulate_grad_batches=accumulate, **kwargs)

        largest, est, at_one = largest_fitting(estimate, budget, cap)
        tried.append((setting.describe(), at_one))
        if largest == 0:
            continue
        accumulate = math.ceil(target / (largest * seq_len * world_size))
        micro = math.ceil(target / (accumulate * seq_len * world_size))  # same steps, least overshoot
        if micro != largest:
            est = estimate(micro)
        return Plan(
            setting=setting,
            max_micro_batch_size=largest,
            micro_batch_size=micro,
            accumulate_grad_batches=accumulate,
            global_batch_tokens=target,
            achieved_global_batch_tokens=micro * seq_len * accumulate * world_size,
            world_size=world_size,
            seq_len=seq_len,
            device_memory=device,
            margin=float(margin),
            estimate=est,
            tried=tuple(tried),
        )
    best_name, best_total = min(tried, key=lambda t: t[1])
    raise NoFitError(
        f"Expected some setting to fit in {format_bytes(budget)} ({format_bytes(device)} with {margin:.0%} kept"
        f" free) at micro-batch 1 and seq_len {seq_len}, got none: the smallest prediction is {best_name}"
        f" -> {format_bytes(best_total)} per rank. Fix: more GPUs (world_size), a shorter seq_len,"
        " a larger device, or a quantized base model."
    )


def _budgeted(estimate: Any) -> int:
    """What must fit: the device total where it is predicted (a CUDA target), else the peak."""
    device = getattr(estimate, "device_total", None)
    return estimate.total if device is None else device
