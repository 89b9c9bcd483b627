"""Stage 4 of the pipeline: the :class:`~lightning_memopt.predictor.report.estimate.MemoryEstimate` of an accounted
step, its categories at the peak and, in ``details``, how each earlier stage got there."""

from typing import Any

from lightning_memopt.predictor.account.accounting import Accounting
from lightning_memopt.predictor.read.reading import ModelReading
from lightning_memopt.predictor.report.estimate import MemoryEstimate
from lightning_memopt.predictor.request import Request
from lightning_memopt.predictor.trace.timeline import Timeline


def report(request: Request, reading: ModelReading, timeline: Timeline, accounting: Accounting) -> MemoryEstimate:
    """The estimate: the six categories of the peak moment (they add up to its total), CUDA's rows, and the details.

    Example:
        >>> from lightning_memopt.predictor.account.accounting import account
        >>> from lightning_memopt.predictor.read.reading import from_count
        >>> from lightning_memopt.predictor.request import make_request
        >>> req, reading = make_request(engine="zero-paper", precision="16-mixed"), from_count(1e9)
        >>> est = report(req, reading, Timeline.empty(), account(reading, Timeline.empty(), req))
        >>> est.total == est.parameters + est.gradients + est.optimizer_states, est.details["engine"]
        (True, 'zero-paper')
    """
    peak = accounting.peak
    details = _details(request, reading, timeline, accounting)
    return MemoryEstimate(
        parameters=int(peak.phase.parameters),
        gradients=int(peak.phase.gradients),
        optimizer_states=int(peak.phase.optimizer_states),
        activations=int(peak.activations),
        logits=int(peak.logits),
        buffers=int(peak.phase.buffers),
        total=int(accounting.total),
        cpu_offloaded=accounting.cpu_offloaded,
        details=details,
        workspaces=accounting.workspaces,
        allocator_rounding=accounting.allocator_rounding,
        reserved=accounting.reserved,
        device_total=accounting.device_total,
    )


def _details(request: Request, reading: ModelReading, timeline: Timeline, accounting: Accounting) -> "dict[str, Any]":
    """The settings, the trace's details, the engine's numbers and the moments, for the curious and for debugging."""
    em = accounting.engine
    details: "dict[str, Any]" = {
        "model": reading.name,
        "num_parameters": reading.num_parameters,
        "trainable_parameters": reading.trainable_parameters,
        "world_size": request.world_size,
        "zero": request.zero,
        "precision": request.precision.name,
        "engine": request.engine,
        "method": request.method,
        "micro_batch_size": timeline.shape[0],
        "seq_len": timeline.shape[1],
        "accumulate_grad_batches": request.accumulate_grad_batches,
        "checkpointed_blocks": 0,
        **timeline.details,
        **em.details,
    }
    if request.engine == "torch" and request.precision.mixed:
        # the lecture's table (section 1): every item at once, although they never coexist at the peak
        P = reading.num_parameters
        details["lecture_breakdown"] = {
            "half_weights": request.precision.compute_bytes * P,
            "fp32_parameters": 4 * P,
            "adam_states": request.optimizer_state_bytes * P,
            "fp32_gradients": 4 * P,
        }
    if em.nvme_offloaded:
        details["nvme_offloaded"] = em.nvme_offloaded
    if accounting.per_rank:
        details["per_rank_total"] = accounting.per_rank
    details["peak_phase"] = accounting.peak.phase.name
    details["phases"] = {m.phase.name: m.total for m in accounting.moments}
    if accounting.cuda:
        details["cuda"] = accounting.cuda
    if accounting.reserved is not None:
        details["reserved_bytes"], details["device_bytes"] = accounting.reserved, accounting.device_total
    return details
