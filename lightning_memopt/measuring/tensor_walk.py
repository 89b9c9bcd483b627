"""Find the tensors an object holds: module parameters and buffers, optimizer states, flat buffers."""

from collections.abc import Iterator, Mapping

import torch
from torch import nn

_MAX_DEPTH = 6


def iter_tensors(objects: object, max_depth: int = _MAX_DEPTH) -> Iterator[torch.Tensor]:
    """Yield every tensor reachable from ``objects``, each Python tensor object once.

    Modules yield their parameters, buffers and gradients, then the tensors in their plain attributes
    (a DeepSpeed engine keeps its ZeRO optimizer there). Optimizers yield their states and parameters.
    Other objects are walked through their attributes, lists, tuples, sets and dicts, up to ``max_depth``
    levels, so that wrappers such as DeepSpeed's ZeRO optimizers (flat bf16 buffers, fp32 partitions,
    Adam states) are covered without naming their fields.

    Args:
        objects: a tensor, module, optimizer, container or any object.
        max_depth: how deep plain objects and containers are walked.

    Example:
        >>> model = nn.Linear(2, 3)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.ones(1, 2)).sum().backward(); optimizer.step()
        >>> sorted(t.numel() for t in iter_tensors([model, optimizer]))
        [3, 3, 3, 6, 6, 6]
    """
    seen: set[int] = set()
    yield from _walk(objects, seen, max_depth)


def _walk(obj: object, seen: set[int], depth: int) -> Iterator[torch.Tensor]:
    if depth < 0 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None and id(obj.grad) not in seen:
            seen.add(id(obj.grad))
            yield obj.grad
        return
    if isinstance(obj, (str, bytes, int, float, bool, type(None), torch.device, torch.dtype)):
        return
    if isinstance(obj, nn.Module):
        for tensor in (*obj.parameters(), *obj.buffers()):
            yield from _walk(tensor, seen, depth)
        for value in _attributes(obj, skip=("_parameters", "_buffers", "_modules")):
            yield from _walk(value, seen, depth - 1)
        return
    if isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from _walk(state, seen, depth - 1)
        for group in obj.param_groups:
            yield from _walk(group.get("params", ()), seen, depth - 1)
        for value in _attributes(obj, skip=("state", "param_groups")):
            yield from _walk(value, seen, depth - 1)
        return
    if isinstance(obj, Mapping):
        for value in obj.values():
            yield from _walk(value, seen, depth - 1)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            yield from _walk(value, seen, depth - 1)
        return
    for value in _attributes(obj, skip=()):
        yield from _walk(value, seen, depth - 1)


def _attributes(obj: object, skip: tuple[str, ...]) -> list[object]:
    try:
        attributes = vars(obj)
    except TypeError:  # no __dict__ (slots, builtins, C extension objects)
        return []
    return [value for name, value in attributes.items() if name not in skip]
