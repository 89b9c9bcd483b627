"""The activation timeline of one training step: what :func:`estimate_memory` combines with the model states.

:func:`step_timeline` traces the step (:mod:`.trace`), at reduced depth when the model is deep
(:mod:`.synthesis`), and for a model built from a config reuses its traces: activations are affine in the
micro-batch (every tensor of a step is either per-sample or shared by the batch, eager attention's ``s x s``
scores included), so the traces at 2 and 3 give every larger micro-batch, op for op (1, where some models take
other paths, is traced itself). The affinity is checked once per setting against a trace at 4; where it does not
hold, each size is traced.
"""

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_memopt.core.blocks import auto_blocks, checkpoint_flags
from lightning_memopt.predictor.expand import synthesize
from lightning_memopt.predictor.precision import Precision
from lightning_memopt.predictor.sources import Source, synthetic_batch
from lightning_memopt.predictor.synthesis import Replica, SynthesisError, block_classes, choose_run
from lightning_memopt.predictor.trace import trace_step
from lightning_memopt.predictor.zero3 import Zero3Settings

#: models with at least this many blocks are traced at reduced depth
SYNTHESIS_MIN_BLOCKS = 8
_CACHE: "OrderedDict[tuple, Timeline]" = OrderedDict()
_CACHE_MAX = 64
_AFFINE: "dict[tuple, bool]" = {}


@dataclass(frozen=True)
class Timeline:
    """Live activation, gradient and logits bytes after every op of one step.

    Attributes:
        live: live bytes of non-model-state tensors (activations, logits, temporaries, gradients in flight).
        grads: gradient bytes handed to the engine so far.
        logits: of ``live``, the logits' bytes.
        forward_end: index of the last op of forward.
        details: how it was obtained (for ``MemoryEstimate.details``).
        gathered: of ``live``, the ZeRO-3 parameters gathered (empty: none, or not told apart).
        grads_in_forward: the fraction of the previous step's gradients alive through the forward (1: Lightning's
            automatic optimization zeroes them after it; less for a manual step whose ``zero_grad`` comes first).
            The moments count the engine's forward gradients whole while any is alive (an upper bound).
        grad_order: the trainable parameters (indices in registration order) in the order their gradients reach
            the engine (empty: not traced, e.g. at reduced depth; the engine then takes reverse registration order).
    """

    live: "tuple[int, ...]"
    grads: "tuple[int, ...]"
    logits: "tuple[int, ...]"
    forward_end: int
    details: "dict[str, Any]" = field(default_factory=dict)
    gathered: "tuple[int, ...]" = ()
    grads_in_forward: float = 1.0
    grad_order: "tuple[int, ...]" = ()

    @classmethod
    def empty(cls) -> "Timeline":
        """No activations (a parameter count)."""
        return cls((0,), (0,), (0,), -1)

    def moments(self) -> "Iterator[tuple[int, int, int, bool, int]]":
        """``(live, gradient bytes, logits, in forward, gathered)``: the highest op of every run of ops between two
        gradients (``in forward``: in the forward, where :attr:`grads_in_forward` of the previous step's gradients are
        alive).

        Example:
            >>> list(Timeline((1, 5, 2, 3, 1), (0, 0, 0, 4, 4), (0, 0, 0, 0, 0), 1).moments())
            [(5, 0, 0, True, 0), (2, 0, 0, False, 0), (3, 4, 0, False, 0)]
        """
        best = None
        gathered = self.gathered or (0,) * len(self.live)
        for i, (live, grads, logits) in enumerate(zip(self.live, self.grads, self.logits)):
            key = (grads, i <= self.forward_end)
            if best is not None and key == best[0] and live <= best[1][0]:
                continue
            if best is not None and key != best[0]:
                yield best[1]
            best = (key, (live, grads, logits, key[1], gathered[i]))
        if best is not None:
            yield best[1]


def batch_shape(batch: Any) -> "tuple[int, int | None] | None":
    """``(micro-batch size, sequence length)`` of a batch: the first tensor with a batch dimension in it (``input_ids``
    first in a mapping); ``None`` when the batch holds no tensor.

    Example:
        >>> batch_shape({"input_ids": torch.zeros(4, 64), "labels": torch.zeros(4, 64)})
        (4, 64)
        >>> batch_shape([torch.zeros(8)])
        (8, None)
    """
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            return None
        return int(batch.shape[0]), (int(batch.shape[1]) if batch.dim() >= 2 else None)
    if isinstance(batch, Mapping):
        items = [batch["input_ids"]] if "input_ids" in batch else []
        items += list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        return None
    for item in items:
        shape = batch_shape(item)
        if shape is not None:
            return shape
    return None


def resize_batch(batch: Any, size: int, micro_batch_size: int) -> Any:
    """``batch`` with ``micro_batch_size`` samples: every tensor whose first dimension is ``size`` gets its rows
    repeated (or cut) to ``micro_batch_size``; other leaves stay.

    Example:
        >>> resize_batch({"x": torch.arange(4).view(2, 2), "n": 7}, 2, 3)["x"].tolist()
        [[0, 1], [2, 3], [0, 1]]
    """
    from torch.utils._pytree import tree_map

    index = torch.arange(micro_batch_size) % size

    def resize(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == size:
            return x[index.to(x.device)] if x.device.type != "meta" else x.new_empty((micro_batch_size, *x.shape[1:]))
        return x

    return tree_map(resize, batch)


def step_timeline(
    source: Source,
    *,
    example_batch: Any,
    micro_batch_size: "int | None",
    seq_len: "int | None",
    precision: Precision,
    engine: str,
    activation_checkpointing: "bool | float | int | None",
    attention: "str | None",
    zero3: "bool | Zero3Settings",
    cuda: bool = False,
    autocast_cache: bool = False,
) -> "tuple[Timeline, tuple[int, int | None]]":
    """The timeline of one step of ``source`` and the ``(micro-batch, seq_len)`` it was traced at.

    Raises:
        ValueError: ``micro_batch_size`` or ``seq_len`` that contradict ``example_batch``, a model whose inputs are
            unknown without an ``example_batch``, or a step that cannot be traced (see :func:`trace_step`).
    """
    settings = dict(
        precision=precision, engine=engine, activation_checkpointing=activation_checkpointing, attention=attention,
        zero3=zero3, cuda=cuda, autocast_cache=autocast_cache,
    )  # fmt: skip
    if example_batch is not None or source.key is None:
        batch, shape = step_batch(source, example_batch, micro_batch_size, seq_len)
        return trace_timeline(source.module, batch, **settings), shape
    micro = micro_batch_size or 1
    seq = batch_shape(synthetic_batch(source.module, 1, seq_len))[1]
    key = (source.key, seq, precision.name, engine, str(activation_checkpointing), attention, zero3, cuda,
           autocast_cache)
    return _built_timeline(source, key, micro, seq_len, settings), (micro, seq)


def step_batch(
    source: Source, example_batch: Any, micro_batch_size: "int | None", seq_len: "int | None"
) -> "tuple[Any, tuple[int, int | None]]":
    """The micro-batch a step is traced on and its ``(micro-batch, seq_len)``: ``example_batch`` resized to
    ``micro_batch_size``, or a synthetic batch of the model's inputs.

    Raises:
        ValueError: a ``seq_len`` that contradicts ``example_batch``, or a model whose inputs are unknown without one.
    """
    if example_batch is not None:
        shape = batch_shape(example_batch) or (micro_batch_size or 1, seq_len)
        if seq_len is not None and shape[1] is not None and seq_len != shape[1]:
            raise ValueError(
                f"Expected `seq_len` to match example_batch ({shape[1]}), got {seq_len}. Fix: drop `seq_len` (the batch"
                " says it) or pass a batch of that length."
            )
        if micro_batch_size is not None and micro_batch_size != shape[0]:
            example_batch, shape = resize_batch(example_batch, shape[0], micro_batch_size), (micro_batch_size, shape[1])
        return example_batch, shape
    micro = micro_batch_size or 1
    batch = synthetic_batch(source.module, micro, seq_len)
    return batch, batch_shape(batch) or (micro, seq_len)


def recorded_trace(source: Source, batch: Any, **settings: Any) -> Any:
    """One step of every block traced with each storage's lifetime recorded (the caching allocator's replay)."""
    from lightning_memopt.predictor.kernels import kernel_twins

    with kernel_twins():
        return trace_step(source.module, batch, record=True, **settings)


def _built_timeline(source: Source, key: tuple, micro: int, seq_len: "int | None", settings: dict) -> Timeline:
    """A config-built model's timeline at ``micro``, from cached traces (see the module docstring)."""

    def traced(b: int) -> Timeline:
        if (key, b) not in _CACHE:
            _CACHE[(key, b)] = trace_timeline(source.module, synthetic_batch(source.module, b, seq_len), **settings)
            while len(_CACHE) > _CACHE_MAX:
                _CACHE.popitem(last=False)
        _CACHE.move_to_end((key, b))
        return _CACHE[(key, b)]

    if micro <= 3 or (key, micro) in _CACHE:  # a single sample may take other paths (squeezed shapes)
        return traced(micro)
    two, three = traced(2), traced(3)
    if key not in _AFFINE:
        guess, four = _affine(two, three, 4), traced(4)
        _AFFINE[key] = guess is not None and (guess.live, guess.grads, guess.logits) == (four.live, four.grads,
                                                                                         four.logits)  # fmt: skip
    guess = _affine(two, three, micro) if _AFFINE[key] else None
    return guess if guess is not None else traced(micro)


def _affine(two: Timeline, three: Timeline, micro: int) -> "Timeline | None":
    """The timeline at ``micro`` from those at 2 and 3, when they line up op for op (else ``None``)."""
    if len(two.live) != len(three.live) or two.forward_end != three.forward_end:
        return None
    k = micro - 2
    return Timeline(
        tuple(a + k * (b - a) for a, b in zip(two.live, three.live)),
        tuple(a + k * (b - a) for a, b in zip(two.grads, three.grads)),
        tuple(a + k * (b - a) for a, b in zip(two.logits, three.logits)),
        two.forward_end,
        {**two.details, "micro_batch_from": "affine in the micro-batch (traced at 2 and 3)"},
        tuple(a + k * (b - a) for a, b in zip(two.gathered, three.gathered)),
        two.grads_in_forward,
        two.grad_order,
    )


def trace_timeline(
    module: Any,
    batch: Any,
    *,
    precision: Precision,
    engine: str,
    activation_checkpointing: "bool | float | int | None",
    attention: "str | None",
    zero3: "bool | Zero3Settings",
    cuda: bool = False,
    autocast_cache: bool = False,
) -> Timeline:
    """Trace one step of ``module`` on ``batch``: at reduced depth with synthesis when it has at least
    :data:`SYNTHESIS_MIN_BLOCKS` blocks and synthesis holds (:mod:`.synthesis`), else every block."""
    from lightning_memopt.predictor.kernels import kernel_twins

    kwargs = dict(precision=precision, engine=engine, activation_checkpointing=activation_checkpointing,
                  attention=attention, zero3=zero3, cuda=cuda, autocast_cache=autocast_cache)  # fmt: skip
    names = auto_blocks(module)
    details: "dict[str, Any]" = {"blocks": len(names)}
    with kernel_twins():
        if len(names) >= SYNTHESIS_MIN_BLOCKS:
            classes = block_classes(module, names, checkpoint_flags(module, activation_checkpointing))
            run = choose_run(classes, [name.rpartition(".")[0] for name in names])
            if len(run) < len(names):
                replica = Replica(names, classes, run)
                try:
                    res = trace_step(module, batch, blocks=replica, **kwargs)
                    live, grads, logits, end, gathered = synthesize(res, replica)
                    details.update(traced_blocks=len(run), saved_bytes=None)
                    if res.depends_on_batch:
                        details["depends_on_batch"] = list(res.depends_on_batch)
                    _own_checkpointing(details, res, module)
                    return Timeline(tuple(live), tuple(grads), tuple(logits), end, details, tuple(gathered),
                                    grads_in_forward=1.0 - res.released_before_forward)  # fmt: skip
                except SynthesisError as err:
                    details["synthesis"] = f"every block traced: {err}"
        res = trace_step(module, batch, **kwargs)
    details.update(traced_blocks=len(names), saved_bytes=res.saved_bytes)
    if res.depends_on_batch:  # the data-dependent ops the step ran, and where (see trace_step)
        details["depends_on_batch"] = list(res.depends_on_batch)
    _own_checkpointing(details, res, module)
    return Timeline(res.live, res.grads, res.logits, res.forward_end, details, res.gathered,
                    1.0 - res.released_before_forward, res.grad_order)  # fmt: skip


def _own_checkpointing(details: "dict[str, Any]", res: Any, module: Any) -> None:
    """Say where the model's own ``torch.utils.checkpoint`` calls ran, and count the blocks as the model has them
    when they set the ``activation_checkpointing`` setting aside (see :func:`~.trace.trace_step`)."""
    if not res.own_checkpoints:
        return
    details["own_checkpoints"] = list(res.own_checkpoints)
    if res.checkpointed_as_is:
        details["checkpointed_blocks"] = sum(checkpoint_flags(module, None))
        details["checkpointing"] = (
            "as the model has it: its own torch.utils.checkpoint calls checkpoint it, so the activation_checkpointing"
            " setting wraps no block on top of them"
        )
