"""Read a DeepSpeed engine's per-rank model-state bytes: parameters, fp32 master copies, gradients, optimizer states.

Pure inspection of live tensors (no allocation): counts each tensor once (views of one flat buffer are counted by
their own extent, so a partition is counted as a partition). Used by the tests and the benchmarks to check ZeRO's
sharding against the formulas of Rajbhandari et al. (2020), Section 5 / Figure 1.
"""

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelStateBytes:
    """Bytes held by one rank, by category.

    Attributes:
        parameters: the module's parameters (ZeRO-3: the rank's partitions plus any gathered or persistent whole
            parameters).
        master_parameters: the optimizer's own parameter copies (fp32 master partitions under mixed precision);
            0 when the optimizer updates the module's parameters directly.
        gradients: module gradients and the optimizer's gradient partitions/buffers.
        optimizer_states: the optimizer's state tensors (Adam's ``exp_avg`` and ``exp_avg_sq``, ``step``).
    """

    parameters: int
    master_parameters: int
    gradients: int
    optimizer_states: int

    def to_dict(self) -> dict[str, int]:
        """The four categories as a dict."""
        return asdict(self)


def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, depth + 1)
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value, depth + 1)


class _Ledger:
    """Bytes of tensors counted once: views into one storage (DeepSpeed's flat buffers and their per-parameter views)
    count the union of the byte ranges they cover."""

    def __init__(self) -> None:
        self._ranges: dict[int, list[tuple[int, int]]] = {}

    def add(self, tensors: Iterable[torch.Tensor]) -> int:
        """Count ``tensors``; return the bytes not counted before."""
        total = 0
        for tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes == 0:
                continue
            base = tensor.untyped_storage().data_ptr()
            start = tensor.data_ptr() - base
            end = start + nbytes
            ranges = self._ranges.setdefault(base, [])  # disjoint, sorted
            covered = sum(max(0, min(end, e) - max(start, s)) for s, e in ranges)
            total += nbytes - covered
            merged: list[tuple[int, int]] = []
            for s, e in sorted([*ranges, (start, end)]):
                if merged and s <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], e))
                else:
                    merged.append((s, e))
            self._ranges[base] = merged
        return total


def model_state_bytes(engine: Any) -> ModelStateBytes:
    """Model-state bytes this rank holds in a :class:`deepspeed.DeepSpeedEngine` (or any object with ``module``
    and ``optimizer``; a plain ``nn.Module`` with an optimizer works through :func:`module_state_bytes`).

    Call it where the states of interest exist: Adam states appear at the first ``step()``; gradients exist
    between backward and the step (e.g. in ``on_before_optimizer_step``).
    """
    return module_state_bytes(engine.module, engine.optimizer)


def module_state_bytes(module: nn.Module, optimizer: Any) -> ModelStateBytes:
    """Model-state bytes of ``module`` and ``optimizer`` (a DeepSpeed ZeRO/mixed-precision wrapper or a torch one).

    Example:
        >>> model = nn.Linear(4, 2)
        >>> opt = torch.optim.AdamW(model.parameters())
        >>> model(torch.ones(1, 4)).sum().backward(); opt.step()
        >>> module_state_bytes(model, opt)
        ModelStateBytes(parameters=40, master_parameters=0, gradients=40, optimizer_states=88)
    """
    ledger = _Ledger()
    module_params = list(module.parameters())
    parameters = ledger.add(module_params)
    parameters += ledger.add(p.ds_tensor for p in module_params if hasattr(p, "ds_tensor"))

    base = getattr(optimizer, "optimizer", optimizer)
    group_params = [p for group in getattr(base, "param_groups", []) for p in group["params"]]
    if base is not optimizer:  # DeepSpeed keeps fp32 partitions outside the param groups between steps (ZeRO-3)
        group_params += [
            t for name, value in vars(optimizer).items()
            if "fp32" in name.lower() and "grad" not in name.lower() for t in _tensors(value)
        ]
    master = ledger.add(group_params)

    grads = [p.grad for p in module_params + group_params if p.grad is not None]
    if base is not optimizer:
        grads += [t for name, value in vars(optimizer).items() if "grad" in name.lower() for t in _tensors(value)]
    gradients = ledger.add(grads)
    states = ledger.add(t for state in getattr(base, "state", {}).values() for t in _tensors(state))
    return ModelStateBytes(parameters, master, gradients, states)
