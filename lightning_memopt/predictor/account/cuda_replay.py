"""The CUDA caching allocator on a traced step: what ``max_memory_allocated`` and ``max_memory_reserved`` report.

``max_memory_allocated`` counts whole blocks (a request is rounded up to 512 bytes, and a large block is handed out
unsplit when less than 1 MiB would remain), and ``max_memory_reserved`` counts the segments behind them.
:func:`run_events` turns a recorded trace into the whole run's allocation sequence (the parameters, two training
steps in Lightning's order, the optimizer's states and temporaries), which :mod:`.cuda_allocator` replays, natively
or with ``expandable_segments:True`` (:func:`replay_model`).
"""

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from lightning_memopt.predictor.account.cuda_allocator import AllocatorResult, AllocatorSettings, simulate
from lightning_memopt.predictor.device import CudaRules
from lightning_memopt.predictor.request import resolve_optimizer


def run_events(
    trace: Any,
    param_bytes: "list[int]",
    trainable: "list[bool]",
    buffer_bytes: "list[int]",
    optimizer_kind: str,
    state_tensors: int,
    rules: CudaRules,
    steps: int = 2,
) -> "list[tuple]":
    """The allocations and frees of a run of ``steps`` training steps of a recorded trace, in the order the caching
    allocator sees them (the event format of :func:`~.cuda_allocator.simulate`; a step's storages are keyed
    ``(step, record index)``); :func:`replay_model` simulates a model's.

    The sequence (the order the allocator sees, which decides best fit): the parameters and buffers, one block each,
    as ``model.to(device)`` makes them; per step, every storage of the traced step in op order (the batch and the
    forward's activations, the backward's temporaries and gradients; :func:`op_order`), a cuBLAS workspace per
    thread at the first forward and the first backward op of the first step, ``zero_grad(set_to_none=True)`` after
    the forward (Lightning calls the step, then ``zero_grad``, then backward), and the optimizer's step: its states
    at the first step (``state_tensors`` per trainable parameter, shaped as it), then its temporaries
    (``"foreach"``: one list shaped as the parameters, freed together; ``"single"``: two per parameter, freed at
    once; ``"fused"``/``"none"``: none).

    Args:
        trace: a :class:`~lightning_memopt.predictor.trace.step.TraceResult` recorded with ``record=True``.
        param_bytes: every parameter's bytes as the engine holds it, in registration order.
        trainable: per parameter, whether it gets a gradient and optimizer states.
        buffer_bytes: every buffer's bytes.
        optimizer_kind: the optimizer's temporaries kind (``resolve_optimizer``'s second value).
        state_tensors: optimizer state tensors per trainable parameter (AdamW: 2; SGD with momentum: 1).
        rules: the device's rules.
        steps: training steps replayed (the second one is the steady state).

    Example:
        >>> from lightning_memopt.predictor.device import cuda_rules
        >>> from lightning_memopt.predictor.trace.step import TraceResult
        >>> step = TraceResult((4096,), (0,), (0,), 0, 0, 0, storages=((0, 1, 4096, 7),), grad_keys=())
        >>> rules = cuda_rules("h100")
        >>> r = simulate(run_events(step, [1000], [True], [], "none", 0, rules), allocator_settings(rules))
        >>> r.peak_allocated == 1024 + 4096 + 2 * 32 * 2**20  # blocks of 512-byte multiples, two workspaces
        True
    """
    records = list(trace.storages)
    gradient_records = trace.gradient_records()
    events: list[tuple] = [("alloc", ("param", i), n) for i, n in enumerate(param_bytes)]
    events += [("alloc", ("buffer", i), n) for i, n in enumerate(buffer_bytes)]
    held: list[tuple] = []  # the gradients of the last backward, freed at the next zero_grad
    for step in range(steps):
        grads: list[tuple] = []
        for t, freed, born in op_order(trace):
            for i in freed:
                if i in gradient_records:
                    grads.append((step, i))
                else:
                    events.append(("free", (step, i)))
            if step == 0 and t in (0, trace.forward_end + 1):
                events.append(("alloc", ("workspace", t), rules.workspace_bytes))
            events += [("alloc", (step, i), records[i][2]) for i in born]
            if t == trace.forward_end:  # zero_grad(set_to_none=True) between the forward and the backward
                events += [("free", key) for key in held]
                held = []
        held = grads
        trained = [i for i, flag in enumerate(trainable) if flag]
        if step == 0:
            events += [("alloc", ("state", i, k), param_bytes[i]) for i in trained for k in range(state_tensors)]
        if optimizer_kind == "foreach":
            events += [("alloc", ("tmp", step, i), param_bytes[i]) for i in trained]
            events += [("free", ("tmp", step, i)) for i in trained]
        elif optimizer_kind == "single":
            for i in trained:
                first, second = ("tmp", step, i, 0), ("tmp", step, i, 1)  # sqrt, then the division; then addcdiv
                events += [("alloc", first, param_bytes[i]), ("alloc", second, param_bytes[i]), ("free", first),
                           ("free", second)]  # fmt: skip
    return events


def replay_model(trace: Any, reading: Any, param_bytes: int, optimizer: str, rules: CudaRules) -> AllocatorResult:
    """The caching allocator's peaks over :func:`model_events`."""
    return simulate(model_events(trace, reading, param_bytes, optimizer, rules), allocator_settings(rules))


def model_events(trace: Any, reading: Any, param_bytes: int, optimizer: str, rules: CudaRules) -> "list[tuple]":
    """:func:`run_events` for a model as the predictor reads it: every parameter in the engine's dtype
    (``param_bytes`` per element; integer weights keep theirs), its registered buffers, and the optimizer's states
    and temporaries (:func:`~lightning_memopt.predictor.request.resolve_optimizer`)."""
    sizes = [p.numel * (param_bytes if p.floating else p.dtype.itemsize) for p in reading.params]
    buffers = [b.numel * b.dtype.itemsize for b in reading.buffers if not b.attribute]
    state_bytes, kind = resolve_optimizer(optimizer)
    # AdamW: m and v, each shaped as the parameter (fp32 here); SGD with momentum: one buffer
    return run_events(trace, sizes, [p.trainable for p in reading.params], buffers, kind, state_bytes // 4, rules)


def allocator_settings(rules: CudaRules) -> AllocatorSettings:
    """The caching allocator's settings on the device ``rules`` describe."""
    return AllocatorSettings(expandable_segments=rules.expandable_segments)


def op_order(trace: Any, keep: "Iterable[int] | None" = None) -> "Iterator[tuple[int, list[int], list[int]]]":
    """Per op ``t`` of a recorded step (and once more after its last op): the records freed before ``t`` ran, then
    the records ``t`` made, as indices into ``trace.storages`` (only those in ``keep``, when given).

    The frees come first: a storage recorded as freed at ``t`` died after op ``t - 1`` returned and before op ``t``
    ran (a Python name rebound, the autograd engine releasing a node's saved tensors), so the allocator had its block
    back before op ``t`` asked for its outputs. Replaying the outputs first would count both at once: a transient
    that no device ever holds (T5's eager attention under checkpointing: a 256 MiB score tensor too many, +4.5 %).

    Example:
        >>> from lightning_memopt.predictor.trace.step import TraceResult
        >>> step = TraceResult((8, 4), (0, 0), (0, 0), 0, 0, 0, storages=((0, 1, 8, 1), (1, 2, 4, 2)))
        >>> list(op_order(step))  # op 1 makes record 1 after record 0 is gone
        [(0, [], [0]), (1, [0], [1]), (2, [1], [])]
    """
    records = trace.storages
    born: "dict[int, list[int]]" = defaultdict(list)
    freed: "dict[int, list[int]]" = defaultdict(list)
    for i in range(len(records)) if keep is None else keep:
        born[records[i][0]].append(i)
        freed[records[i][1]].append(i)
    for t in range(len(trace.live) + 1):
        yield t, freed.get(t, []), born.get(t, [])

