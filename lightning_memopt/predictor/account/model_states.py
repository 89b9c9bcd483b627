"""Per-rank model-state bytes: what DeepSpeed 0.19.8 (ZeRO 0-3) or plain torch really keeps, and when.

Sources (DeepSpeed 0.19.8, ``deepspeed/runtime``):

* ``engine.py`` ``_do_optimizer_sanity_check``: with fp16/bf16 and no ZeRO, a torch optimizer is wrapped in
  ``FP16_UnfusedOptimizer`` (``fp16/unfused_optimizer.py``): per-tensor fp32 master copies, Adam states
  created at construction by a zero-gradient step, fp32 copies of *all* gradients made at the step. fp32
  without ZeRO: the torch optimizer runs as is (states created lazily at the first step). After backward,
  ``allreduce_gradients`` flattens the gradients in chunks of ``MEMORY_OPT_ALLREDUCE_SIZE`` = 5e8 elements
  (``torch.cat``: a copy).
* ``zero/stage_1_and_2.py`` (``DeepSpeedZeroOptimizer``): a flat 16-bit (or fp32) copy of all parameters, the
  fp32 master partition (``single_partition_of_fp32_groups``, a clone even for fp32), the optimizer states of
  that partition (torch Adam: lazily at the first step), an IPG bucket of ``reduce_bucket_size`` elements in
  the parameter dtype from the start of backward (two with ``overlap_comm``), ``grads_in_partition`` (the
  16-bit gradients of the parameters overlapping the rank's partition) after the first bucket reduction, and
  at the step an fp32 gradient partition. Stage 1 keeps full gradients in ``param.grad`` until the end of
  backward.
* ``zero/stage3.py`` + ``partitioned_param_coordinator.py``: 16-bit parameter partitions, a persistent 16-bit gradient
  partition (``grad_partitions_flat_buffer``), one IPG bucket of ``reduce_bucket_size`` allocated at init, full copies
  of parameters below ``stage3_param_persistence_threshold``; the parameters gathered along the step (fetched before a
  module's forward and backward, released after them unless reused within ``stage3_max_reuse_distance`` elements) are
  replayed on the traced step (:mod:`lightning_memopt.predictor.trace.zero3`).
* Optimizer step temporaries (``torch/optim/adam.py``): the single-tensor path (the CPU default) makes two
  temporaries per tensor (``exp_avg_sq.sqrt()`` and its division), the foreach path (CUDA default) one for the
  whole list, the fused path none.

The ZeRO paper's accounting (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", section 3.1 and Figure 1: 2 + 2 + K bytes per parameter, K = 12 for mixed-precision Adam)
is ``engine="zero-paper"``.
"""

import math
from dataclasses import dataclass, field
from typing import Any

from lightning_memopt.core.deepspeed_config import ALLREDUCE_CHUNK, zero_settings
from lightning_memopt.predictor.precision import Precision
from lightning_memopt.predictor.read.reading import ModelReading
from lightning_memopt.predictor.request import resolve_optimizer


@dataclass(frozen=True)
class Phase:
    """Device bytes of one moment of the step, by category (activations added by the caller)."""

    name: str
    parameters: int
    gradients: int
    optimizer_states: int
    buffers: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states + self.buffers


@dataclass(frozen=True)
class EngineMemory:
    """Model-state accounting of one rank.

    ``base`` holds what is on the device for the whole step (steady state, after the first optimizer step);
    ``phases`` the moments without activations (end of backward, optimizer step). During forward/backward the
    engine adds ``backward_extra(grad_elements)`` on top of ``base`` + ``gathered`` + activations (ZeRO-3 parameters
    gathered op by op are in the traced timeline, :mod:`lightning_memopt.predictor.trace.zero3`).
    """

    base: Phase
    gathered: int
    phases: "tuple[Phase, ...]"
    cpu_offloaded: int
    nvme_offloaded: int
    grad_keep_bytes: float
    bucket_bytes: int
    partition_alloc_after: int
    partition_bytes: int
    details: "dict[str, Any]" = field(default_factory=dict)
    accumulation_hold: "tuple[int, int]" = (0, 0)
    forward_gradients: int = 0
    grad_unit: int = 0  # bytes per element of the timeline's gradient bytes (0: the engine's parameter dtype)

    def accumulating_extra(self) -> "tuple[int, int]":
        """(gradient bytes, buffer bytes) held through a micro-step that follows another one before the optimizer
        step (gradient accumulation): the engine keeps what the previous micro-step's backward produced, and the
        new gradients are added into it.
        """
        return self.accumulation_hold

    def backward_extra(self, grad_elements: int) -> "tuple[int, int]":
        """(gradient bytes, buffer bytes) the engine holds once ``grad_elements`` gradients were produced."""
        if grad_elements <= 0:
            return 0, 0
        grads = int(self.grad_keep_bytes * grad_elements)
        partition = self.partition_bytes if grad_elements >= self.partition_alloc_after else 0
        return grads + partition, self.bucket_bytes


def _partition(n: int, world: int) -> int:
    return math.ceil(n / world)


def _trainable_numels(reading: ModelReading) -> "list[int]":
    """Sizes of the trainable tensors in flat-buffer order; unknown for a bare parameter count (per-tensor
    temporaries and bucket boundaries are then left out)."""
    return [p.numel for p in reading.trainable()] if reading.traceable else []


def _temporaries(kind: str, tensors: "list[int]") -> int:
    """fp32 bytes of Adam's step temporaries over the tensors the optimizer loops over."""
    if kind == "single":
        return 2 * 4 * max(tensors, default=0)
    if kind == "foreach":
        return 4 * sum(tensors)
    return 0


def _gathered_stage3(reading: ModelReading, threshold: int, reuse: int, bytes_: int) -> "tuple[int, int]":
    """(gathered bytes held through forward and backward, persistent full-copy bytes) at ZeRO-3.

    A model that is traced holds its gathered parameters in the traced step, op by op, as DeepSpeed's coordinator
    fetches and releases them (:mod:`lightning_memopt.predictor.trace.zero3`): nothing here. A bare parameter count has
    no modules: the last ``max_reuse_distance / 2`` elements of the trace are taken to stay gathered from forward into
    backward (``partitioned_param_coordinator.__params_to_release``).
    """
    if not reading.traceable:
        return min(reading.num_parameters, reuse // 2) * bytes_, 0
    return 0, sum(p.numel for p in reading.params if p.numel <= threshold) * bytes_


def _partition_grad_elements(
    numels: "list[int]", world: int, rank: int, bucket: int, order: "tuple[int, ...] | None" = None
) -> "tuple[int, int]":
    """(elements of the parameters overlapping ``rank``'s flat partition, gradient elements handed to the engine
    when ZeRO-2 first reduces a bucket holding one of them) for ``grads_in_partition``, which that reduction
    allocates (``copy_grads_in_partition``). ``numels`` in flat order; the gradients arrive in ``order`` (indices
    into ``numels``, as traced; the ones it misses, or all without it, in reverse flat order) and fill the IPG
    bucket in that order. A gradient that does not fit has the bucket reduced in its own hook, once it was produced
    (``reduce_independent_p_g_buckets_and_remove_grads``): it is counted in; what is left is reduced after
    backward.

    Example:
        >>> _partition_grad_elements([4, 4, 4, 4], world=2, rank=0, bucket=8)  # rank 0's parameters arrive last
        (8, 16)
        >>> _partition_grad_elements([4, 4, 4, 4], world=2, rank=0, bucket=8, order=(0, 1, 2, 3))
        (8, 12)
    """
    total = sum(numels)
    size = _partition(total, world)
    lo, hi = rank * size, min((rank + 1) * size, total)
    mine, offset = [], 0
    for n in numels:
        mine.append(offset < hi and offset + n > lo)
        offset += n
    inside = sum(n for n, m in zip(numels, mine) if m)
    seen = set(order or ())
    arrival = [*(order or ()), *(i for i in reversed(range(len(numels))) if i not in seen)]
    filled = produced = 0
    holds_mine = False
    for i in arrival:
        n = numels[i]
        if filled and filled + n > bucket:
            if holds_mine:
                return inside, produced + n
            filled, holds_mine = 0, False
        filled += n
        produced += n
        holds_mine = holds_mine or mine[i]
    return inside, produced


def engine_memory(
    reading: ModelReading,
    *,
    world_size: int,
    zero: int,
    precision: Precision,
    optimizer: str,
    offload_optimizer: "bool | str",
    offload_parameters: "bool | str",
    engine: str,
    deepspeed_config: "dict[str, Any] | None",
    rank: "int | None" = None,
    grad_order: "tuple[int, ...] | None" = None,
) -> EngineMemory:
    """Model-state bytes of ``rank`` (default: the last, which receives gradients first) for the given engine.

    Every parameter is held (frozen ones too, in the engine's dtype when floating); gradients, fp32 master copies
    and optimizer states exist for the trainable ones only (DeepSpeed's wrappers keep ``is_optimized_parameter``s,
    ``deepspeed/runtime/utils.py``). ZeRO-3 partitions every parameter, each one separately
    (``partition_parameters.py`` ``_partition_param``: ``ceil(numel / world)`` elements per rank). Only ZeRO-1/2
    differ between ranks (which parameters overlap the rank's partition). Module buffers are in ``buffers``.
    ``grad_order``: the trainable parameters (indices in registration order) in the order their gradients reach the
    engine in the traced backward (:attr:`~lightning_memopt.predictor.trace.timeline.Timeline.grad_order`; ``None``:
    reverse registration order), which ZeRO-2's reduce buckets follow.

    Example:
        >>> from lightning_memopt.predictor.read.reading import from_count
        >>> from lightning_memopt.predictor.precision import resolve_precision
        >>> em = engine_memory(from_count(7.5e9), world_size=64, zero=1,
        ...                    precision=resolve_precision("16-mixed"),
        ...                    optimizer="adam", offload_optimizer=False, offload_parameters=False,
        ...                    engine="zero-paper", deepspeed_config=None)
        >>> em.base.total / 1e9
        31.40625
    """
    state_bytes, temp_kind = resolve_optimizer(optimizer)
    T = reading.trainable_parameters
    W = world_size
    if engine == "zero-paper":
        return _zero_paper(reading.num_parameters, W, zero, precision, state_bytes)
    if engine == "torch":
        return _torch_engine(reading, W, precision, state_bytes, temp_kind)
    dtype = precision.param_dtype("deepspeed")
    b = precision.param_bytes("deepspeed")
    held = reading.param_bytes(dtype)  # every parameter, whole (ZeRO 0-2)
    module_buffers = reading.buffer_bytes(dtype if precision.half else None)
    numels = _trainable_numels(reading)
    largest = max(numels, default=T)
    cfg = zero_settings(deepspeed_config)
    opt_dev = offload_optimizer is False
    par_dev = offload_parameters is False
    where = {"cpu": 0, "nvme": 0}
    details: "dict[str, Any]" = {
        "bytes_per_param_dtype": b, "zero_settings": cfg, "module_buffer_bytes": module_buffers
    }
    if zero == 0:
        master = 4 * T if precision.half else 0
        states = state_bytes * T
        base = Phase("steady", held, 0, master + states, module_buffers)
        grads_fp32 = 4 * T if precision.half else 0
        temps = _temporaries(temp_kind, numels)
        chunk = b * min(T, ALLREDUCE_CHUNK + largest) if W > 1 else 0
        phases = (
            Phase("allreduce", held, b * T, master + states, module_buffers + chunk),
            Phase("step", held, b * T, master + states, module_buffers + grads_fp32 + temps),
        )
        # gradient accumulation (engine.py allreduce_gradients: no reduction off the boundary): param.grad of every
        # trainable parameter stays allocated between micro-steps and the next backward adds into it
        return EngineMemory(base, 0, phases, 0, 0, b, 0, 0, 0, details, (b * T, 0))
    if zero == 3:  # optimizer partitions: the trainable parameters' ZeRO-3 partitions
        Tp = sum(_partition(p.numel, W) for p in reading.trainable()) if reading.traceable else _partition(T, W)
    else:
        Tp = _partition(T, W)
    temps = _temporaries(temp_kind, [min(Tp, cfg["sub_group_size"])] if zero == 3 else [Tp])
    opt_bytes = (4 + state_bytes) * Tp
    if not opt_dev:
        where[offload_optimizer] += opt_bytes + 4 * Tp
        opt_bytes, temps = 0, 0
    grad32 = 4 * Tp if opt_dev else 0
    overlap = cfg["overlap_comm"] if cfg["overlap_comm"] is not None else zero == 3
    if zero in (1, 2):
        bucket = b * cfg["reduce_bucket_size"] * (2 if overlap and zero == 2 else 1)
        bucket = bucket if cfg["contiguous_gradients"] or zero == 1 else 0
        r = W - 1 if rank is None else rank
        inside, after = _partition_grad_elements(numels or [T], W, r, cfg["reduce_bucket_size"], grad_order)
        gip = b * inside if opt_dev else 0
        details["rank"] = r
        if not opt_dev and zero == 2:  # accumulation with offload: accumulated_grads_in_cpu holds the partition's
            # gradients, filled at every micro-step's reduction (ZeRO-1 reduces only at the boundary: never filled)
            details["cpu_accumulation_bytes"] = b * inside
        base = Phase("steady", held, 0, opt_bytes, module_buffers)
        if not opt_dev:
            bucket += b * largest  # temp_grad_buffer_for_gpu_offload
            # host buffers of the offload (stage_1_and_2.py): param_buffer_of_bit16_for_cpu_offload_groups (a 16-bit
            # copy of the rank's partition) and temp_grad_buffer_for_cpu_offload (the largest parameter)
            where["cpu"] += b * (Tp + largest)
        if zero == 1:
            first = _first_bucket_elements(numels or [T], cfg["reduce_bucket_size"])
            phases = (
                Phase("reduce", held, b * (T - first) + gip, opt_bytes, module_buffers + bucket),
                Phase("step", held, 0, opt_bytes, module_buffers + grad32 + temps),
            )
            # accumulation: ZeRO-1 reduces only at the boundary (reduce_ready_partitions_and_remove_grads), so
            # the full 16-bit param.grad and the IPG bucket (setup_buckets) stay allocated between micro-steps
            hold = (b * T, bucket)
            return EngineMemory(base, 0, phases, where["cpu"], where["nvme"], b, bucket, 0, 0, details, hold)
        phases = (Phase("step", held, 0, opt_bytes, module_buffers + grad32 + temps),)
        # accumulation: ZeRO-2 reduces every micro-step into grads_in_partition, which stays until the step
        hold = (gip, bucket)
        return EngineMemory(base, 0, phases, where["cpu"], where["nvme"], 0, bucket, after, gip, details, hold)
    # ZeRO-3: every parameter partitioned, the persistent (small) ones also whole on every rank
    threshold = cfg["stage3_param_persistence_threshold"]
    gathered, persistent = _gathered_stage3(reading, threshold, cfg["stage3_max_reuse_distance"], b)
    gathered = gathered if W > 1 else 0  # one rank gathers nothing: a parameter is a view of its partition
    partitions = (
        sum(_partition(p.numel, W) * (dtype if p.floating else p.dtype).itemsize for p in reading.params)
        if reading.traceable
        else b * _partition(reading.num_parameters, W)
    )
    params = partitions + persistent
    if not par_dev:
        where[offload_parameters] += partitions
        params = persistent
    grad_part = b * Tp if opt_dev else 0
    if not opt_dev:
        where[offload_optimizer] += b * Tp
    bucket = b * cfg["reduce_bucket_size"] if cfg["contiguous_gradients"] else 0
    base = Phase("steady", params, grad_part, opt_bytes, module_buffers + bucket)
    details["persistent_param_bytes"] = persistent
    phases = (Phase("step", params, grad_part, opt_bytes, module_buffers + bucket + grad32 + temps),)
    return EngineMemory(base, gathered, phases, where["cpu"], where["nvme"], 0, 0, 0, 0, details)


def _first_bucket_elements(numels: "list[int]", bucket: int) -> int:
    """Gradient elements in the first IPG bucket reduced at ZeRO-1's end-of-backward reduction (flat order)."""
    total = 0
    for n in numels:
        if total and total + n > bucket:
            break
        total += n
    return total


def _torch_engine(reading: ModelReading, world: int, precision: Precision, state_bytes: int, kind: str) -> EngineMemory:
    """Plain Lightning (single device or DDP): parameters (frozen ones too), gradients and optimizer states of the
    trainable ones, each in its parameter's dtype: as the module holds them under ``*-mixed`` (autocast; fp32
    weights are the usual choice, Micikevicius et al. 2018, section 3), converted under ``*-true``.

    Autocast's half-precision weight copies live from their first use in forward to their use in backward (live
    tensors of the trace). DDP (``world > 1``) adds its gradient buckets, a second copy of the trainable gradients
    (``gradient_as_bucket_view=False``, Lightning's default; frozen parameters are not in DDP's buckets).
    """
    dtype = precision.param_dtype("torch")
    held = reading.param_bytes(dtype)
    grads = reading.param_bytes(dtype, trainable=True)  # a gradient has its parameter's dtype
    module_buffers = reading.buffer_bytes(dtype)
    states = state_bytes * grads // 4  # Adam's states have the parameter's dtype
    ddp = grads if world > 1 else 0
    numels = _trainable_numels(reading)
    temps = _temporaries(kind, numels) * grads // max(4 * sum(numels), 1) if numels else 0
    base = Phase("steady", held, 0, states, module_buffers + ddp)
    phases = (Phase("step", held, grads, states, module_buffers + ddp + temps),)
    # accumulation: param.grad of every parameter stays between micro-steps (Lightning skips DDP's all-reduce
    # with no_sync until the last micro-step)
    # Lightning's automatic optimization calls optimizer.zero_grad() (set_to_none) after training_step and before
    # backward (loops/optimization/automatic.py, Closure.closure), so the previous step's gradients are live
    # through the forward. The timeline's gradients are bytes here (unit 1): parameters may differ in dtype.
    details = {"ddp_bucket_bytes": ddp, "module_buffer_bytes": module_buffers}
    return EngineMemory(base, 0, phases, 0, 0, 1, 0, 0, 0, details, (grads, 0), grads, grad_unit=1)


def _zero_paper(P: int, W: int, zero: int, precision: Precision, state_bytes: int) -> EngineMemory:
    """ZeRO paper, section 3.1 / Figure 1: 2Ψ parameters + 2Ψ gradients + KΨ optimizer states
    (K = 4 + states), partitioned over N_d ranks from stage 1 (optimizer), 2 (+ gradients), 3 (+ parameters).
    """
    half = precision.half
    b = 2 if half else 4
    k = (4 if half else 0) + state_bytes
    params = b * P if zero < 3 else b * P // W
    grads = b * P if zero < 2 else b * P // W
    opt = k * P if zero < 1 else k * P // W
    base = Phase("steady", params, grads, opt, 0)
    return EngineMemory(base, 0, (), 0, 0, 0, 0, 0, 0, {"K": k})
