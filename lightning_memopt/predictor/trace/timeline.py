"""The activation timeline of one training step: what :func:`estimate_memory` combines with the model states.

:func:`step_timeline` traces the step (:mod:`.step`), at reduced depth when the model is deep
(:mod:`.synthesis`), and for a model built from a config reuses its traces: activations are affine in the
micro-batch (every tensor of a step is either per-sample or shared by the batch, eager attention's ``s x s``
scores included), so the traces at 2 and 3 give every larger micro-batch, op for op (1, where some models take
other paths, is traced itself). The affinity is checked once per setting against a trace at 4; where it does not
hold, each size is traced.
"""

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_memopt.core.blocks import auto_blocks, checkpoint_flags
from lightning_memopt.core.deepspeed_config import LeafModules, zero_settings
from lightning_memopt.predictor.device import KernelDevice
from lightning_memopt.predictor.precision import Precision
from lightning_memopt.predictor.read.reading import ModelReading
from lightning_memopt.predictor.read.sources import Source
from lightning_memopt.predictor.request import Request
from lightning_memopt.predictor.trace.batch import batch_shape, step_batch, synthetic_batch
from lightning_memopt.predictor.trace.expand import FullDepth, synthesize
from lightning_memopt.predictor.trace.kernels import kernel_twins
from lightning_memopt.predictor.trace.step import TraceResult, trace_step
from lightning_memopt.predictor.trace.synthesis import Replica, SynthesisError, block_classes, choose_run
from lightning_memopt.predictor.trace.zero3 import Zero3Settings

#: models with at least this many blocks are traced at reduced depth
SYNTHESIS_MIN_BLOCKS = 8
_CACHE: "OrderedDict[tuple, Timeline]" = OrderedDict()
#: a config-built model's recorded steps (the allocator's replay) by setting and micro-batch
_RECORDED: "OrderedDict[tuple, TraceResult]" = OrderedDict()
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
        ungraded: the trainable parameters (their names) no gradient reached in the step (see
            :attr:`~lightning_memopt.predictor.trace.step.TraceResult.ungraded`), at full depth.
        shape: ``(micro-batch, seq_len)`` of the traced batch (``seq_len`` ``None``: the batch has none).
        recorded: one step of every block traced with each storage's lifetime (a
            :class:`~lightning_memopt.predictor.trace.step.TraceResult` recorded with ``record=True``), where the
            caching allocator is replayed; else ``None``.
    """

    live: "tuple[int, ...]"
    grads: "tuple[int, ...]"
    logits: "tuple[int, ...]"
    forward_end: int
    details: "dict[str, Any]" = field(default_factory=dict)
    gathered: "tuple[int, ...]" = ()
    grads_in_forward: float = 1.0
    grad_order: "tuple[int, ...]" = ()
    ungraded: "tuple[str, ...]" = ()
    shape: "tuple[int, int | None]" = (1, None)
    recorded: Any = field(default=None, compare=False)

    @classmethod
    def empty(cls, shape: "tuple[int, int | None]" = (1, None), details: "dict[str, Any] | None" = None) -> "Timeline":
        """No activations (a parameter count, or model states only)."""
        return cls((0,), (0,), (0,), -1, details=dict(details or {}), shape=shape)

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


def step_timeline(source: Source, request: Request) -> Timeline:
    """Stage 2 of the pipeline: the timeline of one training step of ``source`` as ``request`` runs it.

    A parameter count, or the ZeRO paper's accounting (model states only), has none (:meth:`Timeline.empty`). A model
    built from a config reuses its traces (see the module docstring). Where the caching allocator is replayed
    (:attr:`~lightning_memopt.predictor.request.Request.replays_allocator`), the timeline also carries one step of
    every block traced with each storage's lifetime (:attr:`Timeline.recorded`).

    Raises:
        ValueError: ``micro_batch_size`` or ``seq_len`` that contradict ``example_batch``, a model whose inputs are
            unknown without an ``example_batch``, or a step that cannot be traced (see :func:`trace_step`).
    """
    shape = (request.micro_batch_size or 1, request.seq_len)
    if source.module is None:
        count = "not estimated: the model is a parameter count (model states only)"
        return Timeline.empty(shape, {"activations": count})
    if request.engine == "zero-paper":
        return Timeline.empty(shape)
    module = source.module
    zero3 = zero3_settings(source.reading, request)
    settings = dict(
        precision=request.precision, engine=request.trace_engine, zero3=zero3,
        cuda=request.rules.kernels if request.rules is not None else False,
        activation_checkpointing=request.activation_checkpointing, attention=request.attention,
        autocast_cache=request.autocast_cache,
    )  # fmt: skip
    # DeepSpeed's replay follows the gradients in the engine's order, which only a full-depth trace has
    written_out = request.engine != "deepspeed"
    key = None
    if request.example_batch is not None or source.key is None:
        batch, shape = step_batch(module, request.example_batch, request.micro_batch_size, request.seq_len)
        timeline = trace_timeline(module, batch, blocks=source.reading.blocks, record=request.replays_allocator,
                                  written_out=written_out, **settings)  # fmt: skip
    else:
        micro = request.micro_batch_size or 1
        seq = batch_shape(synthetic_batch(module, 1, request.seq_len))[1]
        shape = (micro, seq)
        key = (source.key, seq, request.precision.name, request.trace_engine, str(request.activation_checkpointing),
               request.attention, zero3, settings["cuda"], request.autocast_cache)  # fmt: skip
        timeline = _built_timeline(source, key, micro, request.seq_len, settings)
    recorded = timeline.recorded
    if request.replays_allocator and recorded is None:  # every storage of the step (the allocator's replay)

        def record() -> TraceResult:
            batch, _ = step_batch(module, request.example_batch, request.micro_batch_size, request.seq_len)
            if written_out:  # at reduced depth where synthesis holds, written out
                return trace_timeline(module, batch, blocks=source.reading.blocks, record=True, **settings).recorded
            with kernel_twins():
                return trace_step(module, batch, record=True, **settings)

        recorded = record() if key is None else _cached(_RECORDED, (key, shape[0], written_out), record)
    checkpointed = sum(checkpoint_flags(module, request.activation_checkpointing, source.reading.blocks))
    details = {"checkpointed_blocks": checkpointed, **timeline.details}
    return dataclasses.replace(timeline, details=details, shape=shape, recorded=recorded)


def zero3_settings(reading: ModelReading, request: Request) -> "Zero3Settings | bool":
    """What DeepSpeed's parameter coordinator decides with under ZeRO-3 (:mod:`.zero3`); ``False`` for any other
    stage or engine."""
    if request.engine != "deepspeed" or request.zero != 3:
        return False
    cfg = zero_settings(request.deepspeed_config)
    return Zero3Settings(
        persistence_threshold=int(cfg["stage3_param_persistence_threshold"]),
        max_reuse_distance=int(cfg["stage3_max_reuse_distance"]),
        prefetch_bucket_size=int(cfg["stage3_prefetch_bucket_size"]),
        max_live_parameters=int(cfg["stage3_max_live_parameters"]),
        complete_trace=not reading.step_calls_root,
        partitioned=request.world_size > 1,
        leaves=LeafModules.from_config(request.deepspeed_config),
    )


def _built_timeline(source: Source, key: tuple, micro: int, seq_len: "int | None", settings: dict) -> Timeline:
    """A config-built model's timeline at ``micro``, from cached traces (see the module docstring)."""

    def traced(b: int) -> Timeline:
        def trace() -> Timeline:
            return trace_timeline(source.module, synthetic_batch(source.module, b, seq_len), **settings)

        return _cached(_CACHE, (key, b), trace)

    if micro <= 3 or (key, micro) in _CACHE:  # a single sample may take other paths (squeezed shapes)
        return traced(micro)
    two, three = traced(2), traced(3)
    if key not in _AFFINE:
        guess, four = _affine(two, three, 4), traced(4)
        _AFFINE[key] = guess is not None and (guess.live, guess.grads, guess.logits) == (four.live, four.grads,
                                                                                         four.logits)  # fmt: skip
    guess = _affine(two, three, micro) if _AFFINE[key] else None
    return guess if guess is not None else traced(micro)


def _cached(cache: "OrderedDict[tuple, Any]", key: tuple, make: "Callable[[], Any]") -> Any:
    """``cache[key]``, made by ``make()`` when missing; the least recently used of more than :data:`_CACHE_MAX`
    entries go."""
    if key not in cache:
        cache[key] = make()
        while len(cache) > _CACHE_MAX:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


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
        two.ungraded,
    )


def trace_timeline(
    module: Any,
    batch: Any,
    *,
    blocks: "Sequence[str] | None" = None,
    precision: Precision,
    engine: str,
    activation_checkpointing: "bool | float | int | None",
    attention: "str | None",
    zero3: "bool | Zero3Settings",
    cuda: "bool | KernelDevice" = False,
    autocast_cache: bool = False,
    record: bool = False,
    written_out: bool = True,
) -> Timeline:
    """Trace one step of ``module`` on ``batch``: at reduced depth with synthesis when it has at least
    :data:`SYNTHESIS_MIN_BLOCKS` blocks and synthesis holds (:mod:`.synthesis`), else every block. ``blocks``: the
    model's blocks as read (:attr:`~lightning_memopt.predictor.read.reading.ModelReading.blocks`; ``None``: found
    here). ``record``: keep every storage's lifetime at full depth (:attr:`Timeline.recorded`): a reduced-depth
    trace writes its storages out (:func:`~.expand.synthesize`; no gradient order), unless ``written_out`` is
    ``False``, when only a full-depth trace records and a reduced-depth one leaves ``recorded`` ``None``."""
    kwargs = dict(precision=precision, engine=engine, activation_checkpointing=activation_checkpointing,
                  attention=attention, zero3=zero3, cuda=cuda, autocast_cache=autocast_cache)  # fmt: skip
    names = list(blocks) if blocks is not None else auto_blocks(module)
    details: "dict[str, Any]" = {"blocks": len(names)}
    with kernel_twins():
        if len(names) >= SYNTHESIS_MIN_BLOCKS:
            classes = block_classes(module, names, checkpoint_flags(module, activation_checkpointing, names))
            run = choose_run(classes, [name.rpartition(".")[0] for name in names])
            if len(run) < len(names):
                replica = Replica(names, classes, run)
                write = record and written_out and not isinstance(zero3, Zero3Settings)
                try:
                    res = trace_step(module, batch, blocks=replica, record=write, **kwargs)
                    full = synthesize(res, replica, record=write)
                    details.update(traced_blocks=len(run), saved_bytes=None)
                    if res.depends_on_batch:
                        details["depends_on_batch"] = list(res.depends_on_batch)
                    _own_checkpointing(details, res, module)
                    ungraded = replica.full_depth_names(res.ungraded)
                    _without_gradient(details, ungraded)
                    return Timeline(tuple(full.live), tuple(full.grads), tuple(full.logits), full.forward_end, details,
                                    tuple(full.gathered), grads_in_forward=1.0 - res.released_before_forward,
                                    ungraded=ungraded,
                                    recorded=_recorded(res, full) if write else None)  # fmt: skip
                except SynthesisError as err:
                    details["synthesis"] = f"every block traced: {err}"
        res = trace_step(module, batch, record=record, **kwargs)
    details.update(traced_blocks=len(names), saved_bytes=res.saved_bytes)
    if res.depends_on_batch:  # the data-dependent ops the step ran, and where (see trace_step)
        details["depends_on_batch"] = list(res.depends_on_batch)
    _own_checkpointing(details, res, module)
    _without_gradient(details, res.ungraded)
    return Timeline(res.live, res.grads, res.logits, res.forward_end, details, res.gathered,
                    1.0 - res.released_before_forward, res.grad_order, res.ungraded,
                    recorded=res if record else None)  # fmt: skip


def _recorded(res: TraceResult, full: FullDepth) -> TraceResult:
    """The full-depth step the allocator's replay reads (:attr:`Timeline.recorded`), from a reduced-depth trace
    ``res`` written out (``full``)."""
    return TraceResult(tuple(full.live), tuple(full.grads), tuple(full.logits), full.forward_end, 0, res.grad_bytes,
                       storages=full.storages, grad_keys=full.grad_keys)  # fmt: skip


def _without_gradient(details: "dict[str, Any]", ungraded: "tuple[str, ...]") -> None:
    """Say which trainable parameters the step left without a gradient (the plain engine gives them no gradient and
    no optimizer states)."""
    if ungraded:
        details["without_gradient"] = (
            f"{len(ungraded)} trainable parameter(s) get no gradient in the traced step (e.g. {ungraded[0]}): the"
            " plain engine on one device counts neither a gradient nor optimizer states for them"
        )


def _own_checkpointing(details: "dict[str, Any]", res: Any, module: Any) -> None:
    """Say where the model's own ``torch.utils.checkpoint`` calls ran, and count the blocks as the model has them
    when they set the ``activation_checkpointing`` setting aside (see :func:`~.step.trace_step`)."""
    if not res.own_checkpoints:
        return
    details["own_checkpoints"] = list(res.own_checkpoints)
    if res.checkpointed_as_is:
        details["checkpointed_blocks"] = sum(checkpoint_flags(module, None))
        details["checkpointing"] = (
            "as the model has it: its own torch.utils.checkpoint calls checkpoint it, so the activation_checkpointing"
            " setting wraps no block on top of them"
        )
