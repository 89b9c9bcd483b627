"""The per-step aggregation behind MemoryMonitor, with no Lightning: what one rank measured, merged over the steps
between two logs, the rows and keys logged from every rank's values, and the run's prediction statistics.

The split of Lightning's ``ThroughputMonitor`` (a pure ``Throughput`` in ``lightning.fabric.utilities.throughput``,
a thin callback on top): the callback measures with
:class:`~lightning_memopt.measuring.memory.DeviceMemoryProbe`, gathers and logs; this module only computes.
"""

from typing import Any

import torch

from lightning_memopt.measuring.memory import StepMemory
from lightning_memopt.measuring.tensor_walk import iter_tensors

#: What one rank contributes at a logged step (gathered from every rank in this order; -1: unknown).
FIELDS = ("actual_peak_bytes", "current_bytes", "reserved_bytes", "device_total_bytes", "device_free_bytes",
          "rss_bytes", "predicted_peak_bytes")  # fmt: skip
#: Fields kept at their maximum over the steps between two logs (the others: the last value).
PEAKS = ("actual_peak_bytes", "reserved_bytes", "rss_bytes", "predicted_peak_bytes")


def prediction_error(predicted: float, actual: float) -> float:
    """Signed relative error of a prediction: ``(predicted - actual) / actual``; positive means over-predicted.

    Example:
        >>> prediction_error(110, 100)
        0.1
        >>> prediction_error(0, 0)
        0.0
    """
    if actual <= 0:
        return 0.0 if predicted <= 0 else float("inf")
    return (predicted - actual) / actual


def storage_bytes(obj: object, device: str = "cpu") -> int:
    """Bytes of the distinct storages on ``device`` of the tensors ``obj`` holds (a module, optimizer, engine).

    Example:
        >>> x = torch.zeros(10)
        >>> storage_bytes([x, x[2:], torch.zeros(5, dtype=torch.uint8)])
        45
    """
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in iter_tensors(obj)
                if t.device.type == device}  # fmt: skip
    return sum(storages.values())


class MemoryStepAggregator:
    """One rank's memory per step, merged for logging, and the prediction's statistics over the run.

    Call :meth:`micro_step` after every micro-batch with the probe's :class:`StepMemory` and the predicted peak
    (-1 if none), :meth:`optimizer_step` once per optimizer step, :meth:`take_interval` at a logged step (the
    values since the last log: the peaks at their maximum); :meth:`rows` and :meth:`metrics` turn every rank's
    gathered values into history rows and the logged keys.

    :attr:`run_metrics` are torchmetrics ``Metric`` s, synchronised over the ranks when computed: ``prediction_mape``
    (mean absolute percentage error of the predicted peak), ``prediction_worst_ape`` (the largest absolute relative
    error) over the compared optimizer steps, and ``actual_peak_bytes`` (the highest peak of any step). The steps'
    values wait in Python lists until :meth:`update_run_metrics` hands them over, all at once (at the end of an
    epoch): a step costs no device op.

    Args:
        foreign_bytes: live bytes of the process that are not the run's (an earlier fit's objects), taken off the
            measured peak and current bytes.

    Example:
        >>> agg = MemoryStepAggregator()
        >>> agg.micro_step(StepMemory(100, 50, None, 1000, 500, 300), predicted=110)
        >>> agg.optimizer_step(compare=True)["actual_peak_bytes"]
        100
        >>> rows = MemoryStepAggregator.rows([agg.take_interval()], step=1)
        >>> rows[0]["prediction_error"]
        0.1
        >>> MemoryStepAggregator.metrics(rows, rank=0)["memory/prediction_error_max"]
        0.1
        >>> agg.update_run_metrics()
        >>> round(float(agg.run_metrics["prediction_mape"].compute()), 6)
        0.1
    """

    def __init__(self, foreign_bytes: int = 0) -> None:
        from torchmetrics import MaxMetric, MeanAbsolutePercentageError

        self.foreign_bytes = int(foreign_bytes)
        #: micro-batches since the last optimizer step
        self.micro_steps = 0
        #: the values since the last log (peaks at their maximum), by field
        self.interval: dict[str, int] = {}
        self._step: dict[str, int] = {}
        self._peaks: list[float] = []  # every optimizer step's peak, and (predicted, actual) of those compared
        self._compared: list[tuple[float, float]] = []
        self.run_metrics = {"prediction_mape": MeanAbsolutePercentageError(), "prediction_worst_ape": MaxMetric(),
                            "actual_peak_bytes": MaxMetric()}  # fmt: skip
        self.to("cpu")

    def to(self, device: "torch.device | str") -> "MemoryStepAggregator":
        """Move the run metrics' states to ``device`` (where the ranks synchronise them: the CUDA device with NCCL)."""
        for metric in self.run_metrics.values():
            metric.to(device).set_dtype(torch.float64)  # in float64 (``to`` resets it): bytes beyond 2**24 stay exact
        return self

    def micro_step(self, step: StepMemory, predicted: int) -> None:
        """Add one micro-batch: its measured memory and the predicted peak it is compared with (-1: none)."""
        values = {
            "actual_peak_bytes": step.peak_bytes - self.foreign_bytes,
            "current_bytes": step.current_bytes - self.foreign_bytes,
            "reserved_bytes": -1 if step.reserved_bytes is None else step.reserved_bytes,
            "device_total_bytes": step.device_total,
            "device_free_bytes": step.device_free,
            "rss_bytes": step.rss_bytes,
            "predicted_peak_bytes": predicted,
        }
        for merged in (self.interval, self._step):
            for name, value in values.items():
                merged[name] = max(merged.get(name, value), value) if name in PEAKS else value
        self.micro_steps += 1

    def optimizer_step(self, compare: bool = True) -> dict[str, int]:
        """Close an optimizer step and return its values (peaks over its micro-batches). Its peak enters the run's
        ``actual_peak_bytes``; with ``compare`` and a prediction, its error enters the run's error statistics."""
        step, self._step, self.micro_steps = self._step, {}, 0
        self._peaks.append(float(step["actual_peak_bytes"]))
        if compare and step["predicted_peak_bytes"] >= 0 and step["actual_peak_bytes"] > 0:
            self._compared.append((float(step["predicted_peak_bytes"]), float(step["actual_peak_bytes"])))
        return step

    def update_run_metrics(self) -> None:
        """Hand the optimizer steps closed since the last call to :attr:`run_metrics` (one update each)."""
        device = self.run_metrics["actual_peak_bytes"].device
        if self._peaks:
            self.run_metrics["actual_peak_bytes"].update(torch.tensor(self._peaks, dtype=torch.float64, device=device))
        if self._compared:
            predicted, actual = torch.tensor(self._compared, dtype=torch.float64, device=device).unbind(1)
            self.run_metrics["prediction_mape"].update(predicted, actual)
            self.run_metrics["prediction_worst_ape"].update((predicted - actual).abs() / actual)
        self._peaks, self._compared = [], []

    def take_interval(self) -> list[int]:
        """The values since the last log, in :data:`FIELDS` order, and start a new interval."""
        values, self.interval = [int(self.interval[name]) for name in FIELDS], {}
        return values

    @staticmethod
    def rows(gathered: "list[list[int]]", step: int) -> "list[dict[str, Any]]":
        """History rows ``{"step", "rank", <FIELDS>, "prediction_error"}`` from every rank's :meth:`take_interval`."""
        rows = []
        for rank, values in enumerate(gathered):
            row: dict[str, Any] = {"step": step, "rank": rank, **dict(zip(FIELDS, values))}
            predicted = row["predicted_peak_bytes"]  # -1: no prediction on that rank
            row["prediction_error"] = prediction_error(predicted, row["actual_peak_bytes"]) if predicted >= 0 else None
            rows.append(row)
        return rows

    @staticmethod
    def metrics(rows: "list[dict[str, Any]]", rank: int) -> dict[str, float]:
        """The logged keys of one step from its :meth:`rows`: ``rank``'s values (``memory/<field>``), the maxima over
        ranks (``memory/<peak>_max``) and the error of the largest magnitude (``memory/prediction_error_max``)."""

        def known(name: str, value: Any) -> bool:  # reserved (CPU) and the prediction (none) may be missing
            return value is not None and not (name in ("reserved_bytes", "predicted_peak_bytes") and value < 0)

        metrics = {f"memory/{name}": float(value) for name, value in rows[rank].items()
                   if name not in ("step", "rank") and known(name, value)}  # fmt: skip
        for name in PEAKS:
            if rows[0][name] >= 0:
                metrics[f"memory/{name}_max"] = float(max(row[name] for row in rows))
        errors = [row["prediction_error"] for row in rows if row["prediction_error"] is not None]
        if errors:
            metrics["memory/prediction_error_max"] = max(errors, key=abs)
        return metrics
