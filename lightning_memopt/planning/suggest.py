"""Fixes for a run that does not fit: each change to the run, its predicted peak, ranked cheapest first.

The cost order and the micro-batch search are :mod:`.plan`'s (one search: :func:`~.plan.largest_fitting`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_memopt.core.units import format_bytes, parse_bytes
from lightning_memopt.planning.plan import _check_margin, largest_fitting
from lightning_memopt.predictor.report.estimate import MemoryEstimate

__all__ = ["Suggestion", "suggest_fixes"]


@dataclass(frozen=True)
class Suggestion:
    """A change to the ``estimate_memory`` arguments and the predicted peak after it.

    Attributes:
        description: what changes (``"zero=3"``).
        kwargs_change: the ``estimate_memory`` keyword arguments to change, with their new values
            (``accumulate_grad_batches_factor`` is a multiplier for Lightning's ``accumulate_grad_batches``).
        predicted_total: the predicted peak per rank after the change, in bytes.
        fits: whether it fits the device with the margin.

    Example:
        >>> str(Suggestion("zero=3", {"zero": 3}, 31 * 2**30, True))
        'zero=3 -> 31.00 GiB (fits)'
    """

    description: str
    kwargs_change: "dict[str, Any]"
    predicted_total: int
    fits: bool

    def __str__(self) -> str:
        return f"{self.description} -> {format_bytes(self.predicted_total)} ({'fits' if self.fits else 'too large'})"


def _candidate_changes(
    kwargs: "Mapping[str, Any]", offload_device: str, cuda: bool, zero_config: "dict[str, Any] | None"
) -> "list[tuple[str, dict[str, Any]]]":
    """Single changes in cost order: free kernel swaps, ZeRO stages, checkpointing, offload.

    For a plain-torch run (``engine="torch"``) a ZeRO stage or offload means switching to DeepSpeed
    (``MemOptStrategy``): the change then sets ``engine="deepspeed"`` and ``zero_config``.
    """
    zero = kwargs.get("zero", 0)
    world = kwargs.get("world_size", 1)
    torch_engine = kwargs.get("engine", "deepspeed") == "torch"
    switch: "dict[str, Any]" = {}
    if torch_engine:
        switch = {"engine": "deepspeed", "deepspeed_config": dict(zero_config or {})}
    via = "switch to MemOptStrategy(zero={})" if torch_engine else "zero={}"
    out: "list[tuple[str, dict[str, Any]]]" = []
    if kwargs.get("attention", "sdpa") == "eager":
        out.append(("attention eager -> sdpa", {"attention": "sdpa"}))
    if cuda and not kwargs.get("liger", False):
        out.append(("+ Liger kernels", {"liger": True}))
    if world > 1:
        out += [(via.format(z), {"zero": z, **switch}) for z in range(zero + 1, 4)]
    if not kwargs.get("activation_checkpointing", False):
        out.append(("+ activation checkpointing", {"activation_checkpointing": True}))
    if not kwargs.get("offload_optimizer", False):
        change: "dict[str, Any]" = {"offload_optimizer": offload_device, **switch}
        if zero == 0:
            change["zero"] = 1
        prefix = via.format(1) + ", " if torch_engine else ""
        suffix = " (zero=1)" if zero == 0 and not torch_engine else ""
        out.append((f"{prefix}+ offload optimizer to {offload_device}{suffix}", change))
    if not kwargs.get("offload_parameters", False):
        change = {"offload_parameters": offload_device, "offload_optimizer": offload_device, "zero": 3, **switch}
        prefix = via.format(3) + ", " if torch_engine else ""
        suffix = "" if torch_engine else " (zero=3)"
        out.append((f"{prefix}+ offload parameters and optimizer to {offload_device}{suffix}", change))
    return out


def _without_stage(kwargs: "dict[str, Any]") -> "dict[str, Any]":
    """``kwargs`` with the stage and offload devices moved from its ``deepspeed_config`` into the arguments, so
    that a suggestion may change them (the config keeps its bucket sizes and thresholds)."""
    config = kwargs.get("deepspeed_config")
    if not isinstance(config, dict):
        return kwargs
    config = copy.deepcopy(config)
    zero_config = config.get("zero_optimization") or {}
    out = dict(kwargs, deepspeed_config=config)
    for key, arg in (("offload_optimizer", "offload_optimizer"), ("offload_param", "offload_parameters")):
        device = (zero_config.pop(key, None) or {}).get("device")
        if device not in (None, "none") and not out.get(arg):
            out[arg] = device
    stage = zero_config.pop("stage", None)
    if stage is not None and "zero" not in out:
        out["zero"] = stage
    return out


def suggest_fixes(
    estimate_kwargs: "Mapping[str, Any]",
    device_memory: "int | float | str",
    margin: float = 0.1,
    *,
    offload_device: str = "cpu",
    max_suggestions: int = 5,
    cuda: bool = True,
    zero_config: "dict[str, Any] | None" = None,
) -> "list[Suggestion]":
    """Ranked changes that lower the predicted peak of an ``estimate_memory`` call, fitting ones first.

    Each single change (attention backend, Liger, a higher ZeRO stage, checkpointing, offload) is tried, plus a
    smaller micro-batch with proportionally more gradient accumulation (same global batch, predicted with that
    accumulation), plus the cumulative combination of the single changes in cost order until it fits. Fitting
    suggestions come first in cost order (the module docstring's order; micro-batch reduction ranks after ZeRO and
    before checkpointing), then the others by predicted peak. Changes that do not lower the peak are dropped.

    A ``deepspeed_config`` that sets the stage or offload devices is accepted: they are read into the arguments
    and the suggestions change them. For ``engine="torch"`` (plain Lightning) a ZeRO stage or offload suggestion
    means switching to ``MemOptStrategy``: it is predicted with ``engine="deepspeed"`` and ``zero_config``.

    Args:
        estimate_kwargs: the arguments of the ``estimate_memory`` call, ``model`` included.
        device_memory: one device's memory (bytes or ``"80GiB"``).
        margin: fraction of the device kept free, in [0, 1).
        offload_device: ``"cpu"`` or ``"nvme"`` for the offload suggestions.
        max_suggestions: at most this many suggestions.
        cuda: whether the run is on a CUDA device; Liger's Triton kernels are suggested only then.
        zero_config: the DeepSpeed config (bucket sizes) a ZeRO suggestion for an ``engine="torch"`` run is
            predicted with; ``None``: DeepSpeed's defaults.

    Example:
        >>> fixes = suggest_fixes({"model": "gpt2", "seq_len": 1024, "micro_batch_size": 256}, "16GiB")
        >>> fixes[0].fits, fixes[0].predicted_total <= 16 * 2**30 * 0.9
        (True, True)
    """
    from lightning_memopt.planning.estimate import estimate_memory

    if "model" not in estimate_kwargs:
        raise ValueError("Expected `estimate_kwargs` to hold the `model` passed to estimate_memory, got none.")
    _check_margin(margin)
    budget = int(parse_bytes(device_memory) * (1.0 - margin))
    base = _without_stage(dict(estimate_kwargs))
    current = estimate_memory(**base).total

    ranked: "list[tuple[float, Suggestion]]" = []  # (cost rank, suggestion)
    changes = []
    for description, change in _candidate_changes(base, offload_device, cuda, zero_config):
        try:
            total = estimate_memory(**{**base, **change}).total
        except ValueError:  # a change this model cannot take (a kernel its architecture lacks) is not suggested
            continue
        ranked.append((len(changes), Suggestion(description, change, total, total <= budget)))
        changes.append((description, change))

    micro = base.get("micro_batch_size", 1)
    accumulate = base.get("accumulate_grad_batches", 1)
    if micro > 1:

        def smaller_batch(b: int) -> MemoryEstimate:  # the same global batch: accumulation x ceil(micro / b)
            return estimate_memory(**{**base, "micro_batch_size": b,
                                      "accumulate_grad_batches": accumulate * math.ceil(micro / b)})  # fmt: skip

        largest, _, _ = largest_fitting(smaller_batch, budget, micro)
        smaller = largest if largest >= 1 else 1
        factor = math.ceil(micro / smaller)
        smaller = math.ceil(micro / factor)  # the same global batch with the fewest extra steps
        total = smaller_batch(smaller).total
        description = f"micro-batch {micro} -> {smaller} with accumulate_grad_batches x{factor}"
        change = {"micro_batch_size": smaller, "accumulate_grad_batches": accumulate * factor,
                  "accumulate_grad_batches_factor": factor}  # fmt: skip
        # after the kernel swaps and ZeRO stages, before checkpointing (the first costlier change)
        after = sum(1 for d, _ in changes if d.startswith(("zero", "switch", "attention", "+ Liger")))
        ranked.append((after - 0.5, Suggestion(description, change, total, total <= budget)))

    if not any(s.fits for _, s in ranked):  # combine single changes, cheapest first, until it fits
        combined: "dict[str, Any]" = {}
        names: "list[str]" = []
        for description, change in changes:
            combined.update(change)
            names.append(description)
            total = estimate_memory(**{**base, **combined}).total
            if total <= budget:
                break
        ranked.append((len(changes) + 1, Suggestion(", ".join(names), dict(combined), total, total <= budget)))

    kept = [(r, s) for r, s in ranked if s.predicted_total < current]
    kept.sort(key=lambda rs: (not rs[1].fits, rs[0] if rs[1].fits else rs[1].predicted_total))
    return [s for _, s in kept[:max_suggestions]]

