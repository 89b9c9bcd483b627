"""The allocations a DeepSpeed fit makes from process start, for the caching allocator's replay (one rank, world 1).

``max_memory_reserved`` counts every segment the caching allocator mapped since the process started, and a
monitor's per-step ``reset_peak_memory_stats`` resets only the allocated peak. So DeepSpeed's initialisation
decides what is reserved as much as the step does: its transients leave free blocks behind that the step's
tensors must fit into (or not). :func:`deepspeed_events` writes the whole sequence out, in the event format of
:func:`~lightning_memopt.predictor.account.cuda_allocator.simulate`, from the model's reading, the engine's settings and
one recorded step (:func:`~lightning_memopt.predictor.trace.step.trace_step` with ``record=True``), and
:func:`replay_deepspeed` replays it. The order follows DeepSpeed 0.19.8 (``deepspeed/runtime``) under Lightning
2.6's ``DeepSpeedStrategy`` and was checked event by event against a recorded CPU fit
(``tests/predictor/test_deepspeed_allocations.py``):

* **The module.** Lightning hands the module to ``deepspeed.initialize`` where it was built (``strategies/
  deepspeed.py`` ``setup`` has no ``model_to_device``); ``engine.py`` ``_configure_distributed_model`` casts the
  floating parameters to 16 bits (``_cast_module_mixed_precision``: ``p.data = p.data.to(dtype)``, one parameter
  at a time; buffers keep their dtype) and then calls ``module.to(device)``: one block per parameter in its engine
  dtype, then the buffers. A module already on the device (a CPU fit; ``cast_on_device``) is cast there instead:
  each cast allocates the 16-bit copy and frees the fp32 parameter.
* **ZeRO-0** with 16 bits (``engine.py`` ``_do_optimizer_sanity_check`` -> ``FP16_UnfusedOptimizer``,
  ``fp16/unfused_optimizer.py``): ``__init__`` makes each fp32 master with ``p.clone().float()`` (the clone freed
  at once); ``initialize_optimizer_states`` gives every 16-bit and every fp32 parameter a zero gradient, runs one
  optimizer step (Adam's states and the step's temporaries) and frees the zero gradients. Per step the backward's
  gradients stay in ``param.grad``; ``allreduce_gradients`` flattens them in chunks of
  ``MEMORY_OPT_ALLREDUCE_SIZE`` elements (``allreduce_bucket``: ``torch.cat``, freed after the all-reduce, also at
  world size 1); the step takes the norm (``utils.py`` ``get_weight_norm``: an fp32 copy of each gradient, freed at
  once), makes fp32 gradients (``step``: one per parameter), runs the optimizer and frees the fp32 gradients, then
  the 16-bit ones. Without 16 bits the torch optimizer runs as it is: states at the first step, gradients freed by
  the engine's ``zero_grad`` after it.
* **ZeRO-1/2** (``zero/stage_1_and_2.py``): ``__init__`` flattens the trainable parameters into one buffer
  (``flatten_dense_tensors_aligned``: ``torch.cat``) and frees the per-parameter ones
  (``_update_model_bit16_weights``), makes the fp32 master partition (``.clone().to(fp32)``, the clone freed), and
  ``initialize_optimizer_states`` allocates and frees an fp32 zero gradient (torch's Adam creates its states at the
  first step). Per step: the IPG bucket(s) when the first gradient arrives (``setup_buckets``, freed at the end of
  backward by ``_release_ipg_buffers``), ``grads_in_partition`` at the first bucket reduction (ZeRO-2) or at the
  end of backward (ZeRO-1) (``copy_grads_in_partition``), the norm's fp64 copies (``get_grad_norm_direct``), then
  in ``step`` the flat gradient (``torch.cat``) and its fp32 copy, ``grads_in_partition`` freed, the optimizer, and
  the fp32 gradient freed.
* **ZeRO-3** (``zero/partition_parameters.py``, ``zero/stage3.py``; a module not built under ``zero.Init``, as
  Lightning's ``configure_model`` is not used here): each parameter gets its partition (``_partition_param``:
  ``torch.empty``, the whole parameter freed), the trainable partitions are packed into one buffer
  (``zero/utils.py`` ``defragment``), the fp32 partitions are made per sub-group (``_create_fp32_partitions``:
  ``.to(fp32)`` then ``.clone()``), ``initialize_optimizer_states`` allocates and frees an fp32 zero gradient, and
  ``_setup_for_real_optimizer`` allocates the IPG bucket and the 16-bit gradient partitions
  (``grad_partitions_flat_buffer``), both kept. Then ``create_reduce_and_remove_grad_hooks`` all-gathers every
  trainable parameter once (``param.all_gather()`` -> ``_allgather_params_sequential``: a flat buffer per parameter,
  also at world size 1, freed). At world size 1 a fetch gathers nothing
  (``all_gather_coalesced`` -> ``_no_gather_coalesced``: ``param.data`` is the partition itself), so the gathered
  parameters of a step traced with :class:`~lightning_memopt.predictor.trace.zero3.Zero3Settings` (its records with
  negative keys) are left out. Per step: a bucket reduction of several gradients interleaves them into a new flat
  tensor (``comm/coalesced_collectives.py`` ``reduce_scatter_coalesced``: ``torch.cat``, freed after it), the
  norm's fp64 copies (``stage3.py`` ``get_grad_norm_direct``), and per sub-group the flat gradient and its fp32
  copy (``_prepare_fp32_grad_for_sub_group``), the optimizer, the fp32 gradient freed.

Sizes come from one place each: the IPG bucket, ``grads_in_partition`` and when ZeRO-2 allocates it from
:func:`~lightning_memopt.predictor.account.model_states.engine_memory`, the optimizer's states and temporaries from
:func:`~lightning_memopt.predictor.account.model_states.resolve_optimizer`, the settings from
:func:`~lightning_memopt.core.deepspeed_config.zero_settings`.

Not modelled: more than one rank (the all-gathers, reduce-scatters and partitions of a real data-parallel run),
offload, ``zero.Init``, parameter groups beyond one, the loss scaler's and Lightning's scalars (a few bytes), and
the flat buffers' alignment padding (at most a few elements per parameter).
"""

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from lightning_memopt.core.deepspeed_config import ALLREDUCE_CHUNK, zero_settings
from lightning_memopt.predictor.account.cuda_allocator import AllocatorResult, simulate
from lightning_memopt.predictor.account.cuda_replay import allocator_settings, op_order
from lightning_memopt.predictor.account.model_states import engine_memory
from lightning_memopt.predictor.device import CudaRules
from lightning_memopt.predictor.precision import Precision
from lightning_memopt.predictor.read.reading import ModelReading
from lightning_memopt.predictor.request import resolve_optimizer

#: the first element of every event key: who made the allocation (a test compares the engine's with a real fit's)
ORIGINS = ("param", "buffer", "ds", "opt", "step", "workspace")


def deepspeed_events(
    trace: Any,
    reading: ModelReading,
    *,
    zero: int,
    precision: Precision,
    optimizer: str,
    deepspeed_config: "dict[str, Any] | None" = None,
    steps: int = 2,
    cast_on_device: bool = False,
    workspace_bytes: int = 0,
) -> "list[tuple]":
    """Every allocation and free of a DeepSpeed fit on one rank, from process start (see the module docstring).

    Args:
        trace: the step, a :class:`~lightning_memopt.predictor.trace.step.TraceResult` recorded with ``record=True``
            (engine ``"deepspeed"``; at ZeRO-3 with the :class:`~lightning_memopt.predictor.trace.zero3.Zero3Settings`).
        reading: the model's reading (parameters in registration order, buffers).
        zero: the ZeRO stage, 0-3.
        precision: the resolved precision (16 bits: DeepSpeed's bf16/fp16 sections).
        optimizer: the optimizer's name (:data:`~lightning_memopt.predictor.request.OPTIMIZERS`): AdamW's
            CUDA default is ``"adamw-foreach"``, its CPU default ``"adamw"``.
        deepspeed_config: the config the strategy runs with (bucket sizes resolved; ``None``: DeepSpeed's
            defaults).
        steps: training steps (the first makes the optimizer's states; the second is the steady state).
        cast_on_device: the module is on the training device before DeepSpeed casts it (a CPU fit): its fp32
            parameters are allocated first and each cast frees one; ``False``: the module comes from the CPU and
            ``module.to(device)`` copies the cast parameters (a GPU fit under Lightning).
        workspace_bytes: a cuBLAS workspace allocated at the first forward op and at the first backward op (one
            per thread, :mod:`lightning_memopt.predictor.device`); 0 for none.

    Returns:
        ``("alloc", key, nbytes)`` and ``("free", key)`` in program order; ``key[0]`` is one of :data:`ORIGINS`.

    Raises:
        ValueError: a stage outside 0-3, fewer than one step, or a model without trainable parameters.

    Example:
        >>> from lightning_memopt.predictor.trace.step import TraceResult
        >>> from lightning_memopt.predictor.read.reading import ModelReading, ParamInfo
        >>> from lightning_memopt.predictor.precision import resolve_precision
        >>> import torch
        >>> reading = ModelReading("toy", (ParamInfo("w", "", 1000, torch.float32, True),))
        >>> step = TraceResult((4096,), (0,), (0,), 0, 0, 0, storages=((0, 1, 4096, 7),), grad_keys=())
        >>> ev = deepspeed_events(step, reading, zero=2, precision=resolve_precision("bf16-mixed"),
        ...                       optimizer="adamw-foreach", steps=1)
        >>> [(e[0], e[1][:2]) for e in ev[:4]]
        [('alloc', ('param', 0)), ('alloc', ('ds', 'flat')), ('free', ('param', 0)), ('alloc', ('ds', 'clone'))]
        >>> live_peak(ev)[1]  # after the run: the 16-bit flat, fp32 master, Adam's two states
        14000
    """
    if isinstance(zero, bool) or zero not in (0, 1, 2, 3):
        raise ValueError(f"Expected `zero` (the ZeRO stage) in 0..3, got {zero!r}. Fix: e.g. zero=2.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Expected `steps` >= 1, got {steps!r}. Fix: steps=2 (the second is the steady state).")
    if not reading.trainable_parameters or not reading.traceable:
        raise ValueError(
            f"Expected a read module with trainable parameters, got {reading.name!r}. Fix: read the module"
            " (read_model) rather than a parameter count."
        )
    run = _Run(reading, zero, precision, optimizer, deepspeed_config)
    events = run.module(cast_on_device)
    events += run.init()
    for step in range(steps):
        events += run.step(trace, step, workspace_bytes if step == 0 else 0)
    return events


def replay_deepspeed(events: "list[tuple]", rules: CudaRules) -> AllocatorResult:
    """The caching allocator's peaks over a DeepSpeed fit on one GPU: its :func:`deepspeed_events` (written with the
    device's ``workspace_bytes``) replayed through :func:`~lightning_memopt.predictor.account.cuda_allocator.simulate`
    with the device's rules (expandable segments or not).

    The peaks are those of the last step, as a monitor that resets the peak statistics at each step's start reads
    them: ``peak_allocated`` is that step's ``max_memory_allocated``, ``peak_reserved`` its ``max_memory_reserved``,
    which holds every segment mapped since the process started (the initialisation's included: the allocator keeps
    what it mapped).

    Raises:
        ValueError: events without a training step.
    """
    steps = [e[1][1] for e in events if e[1][0] == "step"]
    if not steps:
        raise ValueError("Expected the events of at least one training step, got none. Fix: deepspeed_events(steps=2).")
    last = next(i for i, e in enumerate(events) if e[1][0] == "step" and e[1][1] == steps[-1])
    return simulate(events, allocator_settings(rules), reset_peaks_at=last)


def live_peak(events: "Iterable[tuple]") -> "tuple[int, int]":
    """(highest, final) live bytes of an event sequence, as requested (no allocator rounding).

    Example:
        >>> live_peak([("alloc", "a", 10), ("alloc", "b", 5), ("free", "a"), ("alloc", "c", 1)])
        (15, 6)
    """
    live: dict[Any, int] = {}
    cur = peak = 0
    for event in events:
        if event[0] == "alloc":
            live[event[1]] = int(event[2])
            cur += int(event[2])
            peak = max(peak, cur)
        else:
            cur -= live.pop(event[1])
    return peak, cur


class _Run:
    """The sizes of one engine, and the events of each phase (module, init, step)."""

    def __init__(
        self,
        reading: ModelReading,
        zero: int,
        precision: Precision,
        optimizer: str,
        deepspeed_config: "dict[str, Any] | None",
    ) -> None:
        self.zero, self.precision = zero, precision
        self.half = precision.half
        self.b = precision.param_bytes("deepspeed")
        params = reading.params
        self.held = [p.numel * (self.b if p.floating else p.dtype.itemsize) for p in params]
        self.numel = [p.numel for p in params]
        self.trained = [i for i, p in enumerate(params) if p.trainable]
        self.buffers = [b.numel * b.dtype.itemsize for b in reading.buffers if not b.attribute]
        state_bytes, self.kind = resolve_optimizer(optimizer)
        self.states = state_bytes // 4  # fp32 tensors per optimized tensor (AdamW: exp_avg, exp_avg_sq)
        self.cfg = zero_settings(deepspeed_config)
        self.em = engine_memory(reading, world_size=1, zero=zero, precision=precision, optimizer=optimizer,
                                offload_optimizer=False, offload_parameters=False, engine="deepspeed",
                                deepspeed_config=deepspeed_config)  # fmt: skip
        self.total = sum(self.numel[i] for i in self.trained)
        overlap = self.cfg["overlap_comm"] if self.cfg["overlap_comm"] is not None else zero == 3
        # the IPG buckets of ZeRO-1/2 (engine_memory counts the double buffer of overlap_comm at ZeRO-2)
        self.ipg = [self.em.bucket_bytes // 2] * 2 if overlap and zero == 2 else [self.em.bucket_bytes]
        self.ipg = [n for n in self.ipg if n]
        self.sub_groups = _groups([self.numel[i] for i in self.trained], int(self.cfg["sub_group_size"]))

    # -- the module ---------------------------------------------------------------------------------------------
    def module(self, cast_on_device: bool) -> "list[tuple]":
        """The parameters on the device in the engine's dtype (``_configure_distributed_model``), then the
        buffers (``module.to(device)``: ``nn.Module._apply``)."""
        events: list[tuple] = []
        if cast_on_device:  # _cast_module_mixed_precision: only a dtype change copies
            cast = [n != 4 * self.numel[i] for i, n in enumerate(self.held)]
            events += [("alloc", ("param", i, "fp32") if c else ("param", i), 4 * self.numel[i])
                       for i, c in enumerate(cast)]  # fmt: skip
            events += [("alloc", ("buffer", j), n) for j, n in enumerate(self.buffers)]
            for i, c in enumerate(cast):
                if c:
                    events += [("alloc", ("param", i), self.held[i]), ("free", ("param", i, "fp32"))]
            return events
        events += [("alloc", ("param", i), n) for i, n in enumerate(self.held)]
        return events + [("alloc", ("buffer", j), n) for j, n in enumerate(self.buffers)]

    # -- the engine's initialisation ----------------------------------------------------------------------------
    def init(self) -> "list[tuple]":
        if self.zero == 0:
            return self._init_zero0()
        if self.zero in (1, 2):
            return self._init_zero12()
        return self._init_zero3()

    def _init_zero0(self) -> "list[tuple]":
        if not self.half:  # the torch optimizer as it is: nothing before the first step
            return []
        events: list[tuple] = []
        for i in self.trained:  # unfused_optimizer.py __init__: p.clone().float()
            n = self.numel[i]
            events += [("alloc", ("ds", "clone", i), self.b * n), ("alloc", ("ds", "master", i), 4 * n),
                       ("free", ("ds", "clone", i))]  # fmt: skip
        # initialize_optimizer_states: zero gradients for the 16-bit and the fp32 parameters, one step, freed
        events += [("alloc", ("ds", "zero16", i), self.b * self.numel[i]) for i in self.trained]
        events += [("alloc", ("ds", "zero32", i), 4 * self.numel[i]) for i in self.trained]
        events += self._optimizer(["init"], [4 * self.numel[i] for i in self.trained], first=True)
        events += [("free", ("ds", "zero16", i)) for i in self.trained]
        return events + [("free", ("ds", "zero32", i)) for i in self.trained]

    def _init_zero12(self) -> "list[tuple]":
        flat = self.b * self.total
        events: list[tuple] = [("alloc", ("ds", "flat"), flat)]  # flatten_dense_tensors_aligned
        events += [("free", ("param", i)) for i in self.trained]  # _update_model_bit16_weights
        events.append(("alloc", ("ds", "clone"), flat))  # .detach().clone().to(fp32)
        if self.half:
            events += [("alloc", ("ds", "master"), 4 * self.total), ("free", ("ds", "clone"))]
        # initialize_optimizer_states: an fp32 zero gradient per group, freed (torch's Adam makes its states lazily)
        return [*events, ("alloc", ("ds", "zero32"), 4 * self.total), ("free", ("ds", "zero32"))]

    def _init_zero3(self) -> "list[tuple]":
        events: list[tuple] = []
        for i, n in enumerate(self.held):  # _partition_param: the partition, then the whole parameter freed
            events += [("alloc", ("ds", "part", i), n), ("free", ("param", i))]
        events.append(("alloc", ("ds", "defrag"), sum(self.held[i] for i in self.trained)))  # utils.py defragment
        events += [("free", ("ds", "part", i)) for i in self.trained]
        for g, numel in enumerate(self.sub_groups):  # _create_fp32_partitions: .to(fp32), then .clone()
            events += [("alloc", ("ds", "to32", g), 4 * numel), ("alloc", ("ds", "master", g), 4 * numel),
                       ("free", ("ds", "to32", g))]  # fmt: skip
        largest = max(self.sub_groups)  # initialize_optimizer_states: one zero gradient of the largest sub-group
        events += [("alloc", ("ds", "zero32"), 4 * largest), ("free", ("ds", "zero32"))]
        if self.cfg["contiguous_gradients"]:  # _setup_for_real_optimizer: the IPG bucket, then the gradient partitions
            events.append(("alloc", ("ds", "ipg3"), self.b * int(self.cfg["reduce_bucket_size"])))
        events.append(("alloc", ("ds", "gradparts"), self.b * self.total))
        for i in self.trained:  # create_reduce_and_remove_grad_hooks: param.all_gather() of every trainable one
            # (_allgather_params_sequential: a flat buffer, also at world size 1), freed at once
            events += [("alloc", ("ds", "gather", i), self.held[i]), ("free", ("ds", "gather", i))]
        return events

    # -- one training step --------------------------------------------------------------------------------------
    def step(self, trace: Any, step: int, workspace: int) -> "list[tuple]":
        """The traced step's storages in op order with the engine's events at the gradients' hand-overs, then
        the optimizer step."""
        records = list(trace.storages)
        if self.zero == 3:  # world size 1: a fetch gathers nothing (_no_gather_coalesced)
            keep = [i for i, r in enumerate(records) if r[3] >= 0]
        else:
            keep = list(range(len(records)))
        gradient_records = trace.gradient_records()
        self._gip, self._last_bucket = False, (0, 0)
        at_handover = self._handover_events(trace, step)
        held: list[tuple] = []  # ZeRO-0: param.grad until the step
        grad_of = _grad_params(records, gradient_records, trace, self.trained)
        events: list[tuple] = []
        for t, freed, born in op_order(trace, keep):
            for i in freed:
                if i in gradient_records and self.zero == 0:
                    held.append((grad_of.get(i, len(self.trained)), ("step", step, i)))
                else:
                    events.append(("free", ("step", step, i)))
            if workspace and t in (0, trace.forward_end + 1):
                events.append(("alloc", ("workspace", t), workspace))
            events += [("alloc", ("step", step, i), records[i][2]) for i in born]
            events += at_handover.get(t, [])
        events += self._end_of_backward(step, bool(trace.grad_keys))
        events += self._optimizer_step(step, [key for _, key in sorted(held)])
        return events

    def _handover_events(self, trace: Any, step: int) -> "dict[int, list[tuple]]":
        """Engine events at the op where a gradient reached it: the IPG buckets at the first (ZeRO-1/2),
        ``grads_in_partition`` at ZeRO-2's first reduction, ZeRO-3's reduce-scatter interleaving copies."""
        out: dict[int, list[tuple]] = defaultdict(list)
        hand = [at for _, at in trace.grad_keys]
        if not hand:
            return out
        if self.zero in (1, 2):
            out[hand[0]] += [("alloc", ("ds", "ipg", step, k), n) for k, n in enumerate(self.ipg)]
        if self.zero == 2:
            produced, after = 0, self.em.partition_alloc_after
            for (_, at), index in zip(trace.grad_keys, trace.grad_order or [None] * len(hand)):
                produced += self.numel[self.trained[index]] if index is not None else 0
                if produced >= after:
                    out[at].append(("alloc", ("ds", "gip", step), self.em.partition_bytes))
                    self._gip = True
                    break
        if self.zero == 3 and trace.grad_order:
            bucket, filled, count = int(self.cfg["reduce_bucket_size"]), 0, 0
            for k, ((_, at), index) in enumerate(zip(trace.grad_keys, trace.grad_order)):
                n = self.numel[self.trained[index]]
                if filled and filled + n > bucket:  # reduce_independent_p_g_buckets_and_remove_grads
                    out[at] += _reduce_copy(step, k, filled, count, self.b)
                    filled, count = 0, 0
                filled, count = filled + n, count + 1
            self._last_bucket = (filled, count)
        return out

    def _end_of_backward(self, step: int, graded: bool) -> "list[tuple]":
        events: list[tuple] = []
        if self.zero == 0 and self.half:  # allreduce_gradients: flattened in chunks, freed after the all-reduce
            for c, n in enumerate(_groups([self.numel[i] for i in self.trained], ALLREDUCE_CHUNK)):
                events += [("alloc", ("ds", "allreduce", step, c), self.b * n), ("free", ("ds", "allreduce", step, c))]
        if self.zero in (1, 2) and not self._gip:  # the last bucket's reduction (ZeRO-1: the only one)
            events.append(("alloc", ("ds", "gip", step), self.em.partition_bytes or self.b * self.total))
        if self.zero in (1, 2) and graded:  # _release_ipg_buffers
            events += [("free", ("ds", "ipg", step, k)) for k in range(len(self.ipg))]
        if self.zero == 3:
            events += _reduce_copy(step, "last", *self._last_bucket, self.b)
        return events

    def _optimizer_step(self, step: int, grads16: "list[tuple]") -> "list[tuple]":
        first = step == 0
        events: list[tuple] = []
        if self.zero == 0:
            if self.half:
                events += self._norm(step)
                events += [("alloc", ("ds", "grad32", step, i), 4 * self.numel[i]) for i in self.trained]
                events += self._optimizer([step], [4 * self.numel[i] for i in self.trained], first=False)
                events += [("free", ("ds", "grad32", step, i)) for i in self.trained]
            else:
                events += self._optimizer([step], [4 * self.numel[i] for i in self.trained], first=first)
            return events + [("free", key) for key in grads16]
        events += self._norm(step)
        groups = [self.total] if self.zero in (1, 2) else self.sub_groups
        for g, numel in enumerate(groups):  # step / _prepare_fp32_grad_for_sub_group: torch.cat, then .to(fp32)
            cat, grad32 = ("ds", "cat", step, g), ("ds", "grad32", step, g)
            events += [("alloc", cat, self.b * numel), ("alloc", grad32, 4 * numel), ("free", cat)]
            if self.zero in (1, 2) and g == len(groups) - 1:
                events.append(("free", ("ds", "gip", step)))
            events += self._optimizer([step, g], [4 * numel], first=first, names=[g])
            events.append(("free", grad32))
        return events

    def _norm(self, step: int) -> "list[tuple]":
        """The gradient norm's copy of each gradient, freed at once: fp32 at ZeRO-0 (``utils.py``
        ``get_weight_norm``: ``p.data.float()``), fp64 at ZeRO-1-3 where the device has it (``get_grad_norm_direct``:
        ``g.to(get_norm_dtype())``, ``zero/utils.py``; CUDA and the CPU do)."""
        if self.zero == 0 and not self.half:
            return []
        width = 4 if self.zero == 0 else 8
        out: list[tuple] = []
        for i in self.trained:
            key = ("ds", "norm", step, i)
            out += [("alloc", key, width * self.numel[i]), ("free", key)]
        return out

    def _optimizer(
        self, tag: "list[Any]", sizes: "list[int]", *, first: bool, names: "list[Any] | None" = None
    ) -> "list[tuple]":
        """torch's Adam/SGD step over tensors of ``sizes`` fp32 bytes: the states at the first step (``_init_group``:
        ``exp_avg`` then ``exp_avg_sq`` per tensor), then the temporaries (``foreach``: one list, freed together;
        ``single``: ``exp_avg_sq.sqrt()`` and its division per tensor, the division kept until the next one's)."""
        names = names if names is not None else list(range(len(sizes)))
        events: list[tuple] = []
        if first:
            for name, n in zip(names, sizes):
                events += [("alloc", ("opt", "state", name, k), n) for k in range(self.states)]
        tmp = ("opt", "tmp", *tag)
        if self.kind == "foreach":
            events += [("alloc", (*tmp, k), n) for k, n in enumerate(sizes)]
            events += [("free", (*tmp, k)) for k in range(len(sizes))]
        elif self.kind == "single":  # denom = exp_avg_sq.sqrt() / ...: bound until the next tensor's replaces it
            for k, n in enumerate(sizes):
                a, b = (*tmp, k, 0), (*tmp, k, 1)
                events += [("alloc", a, n), ("alloc", b, n), ("free", a)]
                events += [("free", (*tmp, k - 1, 1))] if k else []
            events += [("free", (*tmp, len(sizes) - 1, 1))] if sizes else []
        return events


def _reduce_copy(step: int, k: Any, filled: int, count: int, b: int) -> "list[tuple]":
    """``reduce_scatter_coalesced``'s interleaved copy of a bucket of several gradients (one needs none)."""
    if count < 2:
        return []
    key = ("ds", "scatter", step, k)
    return [("alloc", key, b * filled), ("free", key)]


def _groups(numels: "list[int]", size: int) -> "list[int]":
    """Elements per group of whole tensors taken in order, a group closed once it holds ``size`` elements: the
    gradients' flattened chunks (``engine.py`` ``allreduce_gradients`` -> ``buffered_allreduce_fallback``) and ZeRO-3's
    optimizer sub-groups (``stage3.py`` ``_create_fp16_sub_groups``).

    Example:
        >>> _groups([4, 4, 4, 4, 1], 8)
        [8, 8, 1]
    """
    out, cur = [], 0
    for n in numels:
        cur += n
        if cur >= size:
            out.append(cur)
            cur = 0
    return out + ([cur] if cur else [])


def _grad_params(
    records: "list[tuple]", gradients: "set[int]", trace: Any, trained: "list[int]"
) -> "dict[int, int]":
    """Gradient record -> position of its parameter among the trainable ones (the order the engine frees them)."""
    by_key: dict[int, list[int]] = defaultdict(list)
    for i in gradients:
        by_key[records[i][3]].append(i)
    out = {}
    for (key, at), index in zip(trace.grad_keys, trace.grad_order or ()):
        for i in by_key.get(key, ()):
            if records[i][0] <= at <= records[i][1]:
                out[i] = index
    return out
