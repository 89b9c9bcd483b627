"""The predictor's output: per-rank bytes by category, with a table for people and a dict for machines."""

from dataclasses import asdict, dataclass, fields
from typing import Any

from lightning_memopt.core.units import format_bytes, parse_bytes

#: Categories that add up to the predicted peak, in table order.
CATEGORIES = ("parameters", "gradients", "optimizer_states", "activations", "logits", "buffers")


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted memory of one rank, in bytes.

    The six categories are the components *at the predicted peak* (the moment of the step where the rank's
    accelerator memory is highest), so they add up to ``total``. ``cpu_offloaded`` is host memory taken by
    offloaded model states (not part of ``total``). ``details`` holds the inputs and intermediate numbers
    (e.g. the phase of the peak, bytes per parameter) for the curious and for debugging.

    Attributes:
        parameters: parameter bytes on the device (all copies the engine keeps on it: half-precision working
            copy, fp32 master where it lives on the device, gathered ZeRO-3 parameters are in ``buffers``).
        gradients: gradient bytes on the device at the peak.
        optimizer_states: optimizer state bytes on the device (Adam's m and v, ...).
        activations: bytes saved for backward (and recomputed during backward under checkpointing).
        logits: logits, their fp32 upcast and the loss' intermediates.
        buffers: communication buckets, gathered ZeRO-3 parameters, optimizer-step temporaries.
        total: the predicted peak: what ``torch.cuda.max_memory_allocated`` reports on a CUDA target (the
            categories, the cuBLAS workspaces and the allocator's block rounding).
        cpu_offloaded: host bytes of offloaded parameters / optimizer states.
        details: free-form extra information (JSON-serialisable).
        workspaces: cuBLAS workspaces the step holds (CUDA targets; :mod:`lightning_memopt.predictor.device`).
        allocator_rounding: bytes the caching allocator's blocks add to the live bytes at the peak (CUDA targets).
        reserved: the predicted ``torch.cuda.max_memory_reserved`` (``None``: not predicted, e.g. on the CPU).
        device_total: the predicted device memory in use, as ``mem_get_info`` reports it: reserved plus the CUDA
            context (``None``: not predicted).

    Example:
        >>> est = MemoryEstimate(parameters=2, gradients=2, optimizer_states=12, activations=4, logits=0,
        ...                      buffers=0, total=20)
        >>> est.fits("1KiB")
        True
        >>> est.to_dict()["total"]
        20
    """

    parameters: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    buffers: int
    total: int
    cpu_offloaded: int = 0
    details: "dict[str, Any] | None" = None
    workspaces: int = 0
    allocator_rounding: int = 0
    reserved: "int | None" = None
    device_total: "int | None" = None

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "details":
                continue
            value = getattr(self, f.name)
            if value is None and f.name in ("reserved", "device_total"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Expected `{f.name}` to be a non-negative int of bytes, got {value!r}.")
        parts = sum(getattr(self, name) for name in CATEGORIES) + self.workspaces + self.allocator_rounding
        if self.total < parts:
            raise ValueError(f"Expected `total` >= the sum of the categories ({parts}), got {self.total}.")

    @property
    def model_states(self) -> int:
        """Parameters + gradients + optimizer states (the ZeRO paper's "model states")."""
        return self.parameters + self.gradients + self.optimizer_states

    @property
    def budgeted(self) -> int:
        """What must fit in the device: the device total when predicted (reserved + context), else the peak."""
        return self.device_total if self.device_total is not None else self.total

    def fits(self, device_bytes: "int | float | str", margin: float = 0.0) -> bool:
        """Whether the predicted device total (:attr:`budgeted`) fits in ``device_bytes`` with a relative ``margin``
        kept free.

        Args:
            device_bytes: the device's memory (bytes, or a string like ``"80GiB"``).
            margin: fraction of the device kept free, in [0, 1).
        """
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"Expected `margin` in [0, 1), got {margin!r}.")
        return self.budgeted <= parse_bytes(device_bytes) * (1.0 - margin)

    def to_dict(self) -> "dict[str, Any]":
        """All fields as a JSON-serialisable dict (bytes as ints)."""
        return asdict(self)

    def table(self, unit: str = "GiB") -> str:
        """A per-category breakdown like the lecture's table.

        Example:
            >>> print(MemoryEstimate(parameters=2**30, gradients=2**30, optimizer_states=0, activations=0,
            ...                      logits=0, buffers=0, total=2**31).table())
            category          |     memory | share
            ------------------+------------+------
            parameters        |   1.00 GiB |  50 %
            gradients         |   1.00 GiB |  50 %
            optimizer_states  |   0.00 GiB |   0 %
            activations       |   0.00 GiB |   0 %
            logits            |   0.00 GiB |   0 %
            buffers           |   0.00 GiB |   0 %
            ------------------+------------+------
            total (peak)      |   2.00 GiB | 100 %
        """
        rows = ["category          |     memory | share", "------------------+------------+------"]
        for name in CATEGORIES:
            value = getattr(self, name)
            share = 100 * value / self.total if self.total else 0.0
            rows.append(f"{name:<18}| {format_bytes(value, unit):>10} | {share:3.0f} %")
        for name, value in (("cuBLAS workspaces", self.workspaces), ("allocator blocks", self.allocator_rounding)):
            if value:
                rows.append(f"{name:<18}| {format_bytes(value, unit):>10} | {100 * value / self.total:3.0f} %")
        rows.append("------------------+------------+------")
        rows.append(f"{'total (peak)':<18}| {format_bytes(self.total, unit):>10} | 100 %")
        if self.reserved is not None:
            rows.append(f"{'reserved (cache)':<18}| {format_bytes(self.reserved, unit):>10} |")
        if self.device_total is not None:
            rows.append(f"{'device (+context)':<18}| {format_bytes(self.device_total, unit):>10} |")
        if self.cpu_offloaded:
            rows.append(f"{'cpu offloaded':<18}| {format_bytes(self.cpu_offloaded, unit):>10} |")
        return "\n".join(rows)
