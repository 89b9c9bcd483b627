"""Stage 3 of the pipeline: the engine and the device on the step's timeline.

:func:`account` puts what the engine keeps (:mod:`.model_states`: parameters, gradients, optimizer states, buckets,
per rank) beside every moment of the traced step (:class:`~lightning_memopt.predictor.trace.timeline.Timeline`),
finds the highest moment of the rank that peaks highest, and adds what a CUDA device adds on top
(:mod:`.cuda_replay`: the cuBLAS workspaces, the caching allocator's blocks and segments, the context).
"""

from dataclasses import dataclass, field
from typing import Any

from lightning_memopt.predictor.account.cuda_replay import replay_model
from lightning_memopt.predictor.account.deepspeed_allocations import deepspeed_events, replay_deepspeed
from lightning_memopt.predictor.account.model_states import EngineMemory, Phase, engine_memory
from lightning_memopt.predictor.read.reading import ModelReading
from lightning_memopt.predictor.request import Request
from lightning_memopt.predictor.trace.timeline import Timeline

#: ranks accounted one by one at ZeRO-1/2 up to this world size; beyond it, the ranks at the edges and the middle
EVERY_RANK_UP_TO = 16


@dataclass(frozen=True)
class Moment:
    """One moment of the step on one rank: the model-state phase and the activation and logits bytes beside it."""

    phase: Phase
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.phase.total + self.activations + self.logits


@dataclass(frozen=True)
class Accounting:
    """What one rank holds at the step's peak, by category, and what CUDA adds.

    Attributes:
        peak: the highest moment of the rank that peaks highest.
        moments: that rank's moments: the highest of forward and backward, then the engine's own (gradient
            reduction, optimizer step).
        engine: the model-state accounting of the last rank accounted (its details and offloaded bytes).
        per_rank: the peak of every rank accounted, where ranks differ (ZeRO-1/2 on several ranks); else empty.
        cpu_offloaded: host bytes of offloaded model states (and of accumulated gradients, when accumulating).
        workspaces: the cuBLAS workspaces (CUDA targets).
        allocator_rounding: what the caching allocator's blocks add to the live bytes at the peak.
        reserved: the predicted ``max_memory_reserved`` (``None``: not predicted; the reason in ``cuda``).
        device_total: reserved plus the CUDA context (``None``: not predicted).
        cuda: what the device rules were and how reserved was obtained (for ``MemoryEstimate.details``); empty on the
            CPU.
    """

    peak: Moment
    moments: "tuple[Moment, ...]"
    engine: EngineMemory
    per_rank: "dict[int, int]" = field(default_factory=dict)
    cpu_offloaded: int = 0
    workspaces: int = 0
    allocator_rounding: int = 0
    reserved: "int | None" = None
    device_total: "int | None" = None
    cuda: "dict[str, Any]" = field(default_factory=dict)

    @property
    def total(self) -> int:
        """The predicted peak: the categories at the peak moment plus, on CUDA, the workspaces and block rounding."""
        return self.peak.total + self.workspaces + self.allocator_rounding


def account(reading: ModelReading, timeline: Timeline, request: Request) -> Accounting:
    """Account for the engine and the device on ``timeline`` (see the module docstring).

    Example:
        >>> from lightning_memopt.predictor.read.reading import from_count
        >>> from lightning_memopt.predictor.request import make_request
        >>> req = make_request(zero=1, world_size=64, precision="16-mixed", optimizer="adam", engine="zero-paper")
        >>> acc = account(from_count(7.5e9), Timeline.empty(), req)
        >>> acc.total / 1e9  # the ZeRO paper's 2 + 2 + 12 / 64 bytes per parameter
        31.40625
    """
    if request.engine == "torch" and request.world_size == 1:  # torch's optimizers skip a parameter without .grad
        reading = reading.without_gradients(timeline.ungraded)  # (DDP's buckets hold it all the same)
    ranks = _ranks(request)
    engines = {
        r: engine_memory(
            reading,
            world_size=request.world_size,
            zero=request.zero,
            precision=request.precision,
            optimizer=request.optimizer,
            offload_optimizer=request.offload_optimizer,
            offload_parameters=request.offload_parameters,
            engine=request.engine,
            deepspeed_config=request.deepspeed_config,
            rank=r,
            grad_order=timeline.grad_order or None,  # ZeRO-2's buckets fill in the traced arrival order
        )
        for r in ranks
    }
    grad_bytes = request.precision.param_bytes(request.trace_engine)  # DeepSpeed: every trainable one in its dtype
    accumulating = request.accumulate_grad_batches > 1
    per_rank, best = {}, None
    for r, em in engines.items():
        moments = step_moments(em, timeline, grad_bytes, accumulating)
        top = max(moments, key=lambda m: m.total)
        per_rank[r] = top.total
        if best is None or top.total > best[0].total:
            best = top, moments
    em = engines[ranks[-1]]
    cpu = em.cpu_offloaded + (em.details.get("cpu_accumulation_bytes", 0) if accumulating else 0)
    peak, moments = best
    cuda = _on_cuda(reading, timeline, request, peak.total)
    return Accounting(peak, tuple(moments), em, per_rank if ranks != [None] else {}, int(cpu), **cuda)


def _ranks(request: Request) -> "list[int | None]":
    """The ranks to account: every one (or the edges and the middle of many) where they differ, ZeRO-1/2's partitions
    over several ranks; else one (``None``: the last rank, which receives gradients first)."""
    if request.engine != "deepspeed" or request.zero not in (1, 2) or request.world_size == 1:
        return [None]
    w = request.world_size
    return list(range(w)) if w <= EVERY_RANK_UP_TO else sorted({0, 1, w // 2, w - 2, w - 1})


def step_moments(em: EngineMemory, timeline: Timeline, grad_bytes: int, accumulating: bool = False) -> "list[Moment]":
    """Every moment of one rank: the step's highest moment of forward and backward, then the engine's moments
    (gradient reduction, optimizer step) with what the step leaves alive after its backward (the batch, which
    Lightning's loop holds until the optimizer step is done, and whatever the ``training_step`` kept). ZeRO-3
    parameters gathered at a moment (in the traced timeline) count as parameters.

    ``accumulating``: the moments of a micro-step that follows another one (gradient accumulation), when what the
    engine holds between micro-steps is there from the start and the new gradients are added into it.
    """
    base = em.base
    best = None
    unit = em.grad_unit or grad_bytes
    for live, grads, logits, forward, gathered in timeline.moments():
        g, buf = em.backward_extra(grads // unit)
        if forward:  # the previous step's gradients a step did not free before its forward
            g = max(g, int(em.forward_gradients * timeline.grads_in_forward))
        if accumulating:
            held_g, held_buf = em.accumulating_extra()
            g, buf = max(g, held_g), max(buf, held_buf)
        phase = Phase(
            "backward",
            base.parameters + em.gathered + gathered,
            base.gradients + g,
            base.optimizer_states,
            base.buffers + buf,
        )
        moment = Moment(phase, live - logits - gathered, logits)
        if best is None or moment.total > best.total:
            best = moment
    gathered = timeline.gathered[-1] if timeline.gathered else 0
    left = (timeline.live[-1] - timeline.logits[-1] - gathered, timeline.logits[-1])  # after the backward
    return [best, *(Moment(p, *left) for p in em.phases)]


def _on_cuda(reading: ModelReading, timeline: Timeline, request: Request, total: int) -> "dict[str, Any]":
    """What CUDA adds: the workspaces, and where the run's allocation sequence is known (the timeline's recorded step,
    :attr:`~lightning_memopt.predictor.request.Request.replays_allocator`) the allocator's blocks, its reserved peak
    and the device total."""
    rules = request.rules
    if rules is None:
        return {}
    out: "dict[str, Any]" = {"workspaces": rules.workspaces}
    out["cuda"] = cuda = {"device": rules.name, "capability": list(rules.capability),
                          "workspace_bytes": rules.workspace_bytes, "expandable_segments": rules.expandable_segments,
                          "context_bytes": rules.context_bytes}  # fmt: skip
    if timeline.recorded is None:
        cuda["reserved"] = (
            "not predicted: the caching allocator is replayed on one device, for the plain engine and for DeepSpeed"
            " without offload or gradient accumulation (several ranks' and DDP's buffers, offload and accumulation"
            " are not in the replayed sequence yet)"
        )
        return out
    if request.engine == "deepspeed":  # the engine's initialisation and two steps (:mod:`.deepspeed_allocations`)
        events = deepspeed_events(timeline.recorded, reading, zero=request.zero, precision=request.precision,
                                  optimizer=request.optimizer, deepspeed_config=request.deepspeed_config,
                                  workspace_bytes=rules.workspace_bytes)  # fmt: skip
        sim = replay_deepspeed(events, rules)
    else:
        bytes_per_element = request.precision.param_bytes(request.trace_engine)
        sim = replay_model(timeline.recorded, reading, bytes_per_element, request.optimizer, rules)
    out["allocator_rounding"] = rounding = max(0, sim.peak_allocated - total - rules.workspaces)
    out["reserved"] = max(sim.peak_reserved, total + rules.workspaces + rounding)
    if rules.context_bytes is not None:
        out["device_total"] = out["reserved"] + rules.context_bytes
    cuda["segments"] = sim.num_segments
    return out
