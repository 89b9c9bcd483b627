"""MemoryStepAggregator: micro-batches merged into optimizer steps and log intervals, the rows and keys logged from
every rank's values, and the torchmetrics run statistics (no Lightning)."""

import pytest

from lightning_memopt.measuring.memory import StepMemory
from lightning_memopt.measuring.memory_steps import FIELDS, MemoryStepAggregator, prediction_error


def step(peak: int, current: int, rss: int = 1000) -> StepMemory:
    return StepMemory(peak, current, None, 10_000, 5_000, rss)


def test_micro_batches_merge_into_the_optimizer_step_and_the_log_interval() -> None:
    agg = MemoryStepAggregator(foreign_bytes=10)
    agg.micro_step(step(110, 60, rss=900), predicted=90)
    agg.micro_step(step(160, 70, rss=800), predicted=100)
    first = agg.optimizer_step(compare=False)
    assert (first["actual_peak_bytes"], first["current_bytes"]) == (150, 60)  # max peak, last current; less foreign
    assert (first["predicted_peak_bytes"], first["rss_bytes"]) == (100, 900)
    assert agg.micro_steps == 0
    agg.micro_step(step(130, 50), predicted=120)
    agg.optimizer_step(compare=True)
    values = dict(zip(FIELDS, agg.take_interval()))  # both steps since the last log
    assert (values["actual_peak_bytes"], values["current_bytes"], values["predicted_peak_bytes"]) == (150, 40, 120)
    assert values["reserved_bytes"] == -1 and agg.interval == {}
    agg.update_run_metrics()
    metrics = {name: float(metric.compute()) for name, metric in agg.run_metrics.items()}
    assert metrics["prediction_mape"] == pytest.approx(0.0)  # only the compared step: 120 predicted, 120 actual
    assert metrics["actual_peak_bytes"] == 150  # every step's peak


def test_run_statistics_over_the_compared_steps() -> None:
    agg = MemoryStepAggregator()
    for actual, predicted in ((100, 150), (100, 90), (200, 210)):
        agg.micro_step(step(actual, 1), predicted)
        agg.optimizer_step(compare=True)
    agg.micro_step(step(500, 1), predicted=-1)  # no prediction: its error is not known
    agg.optimizer_step(compare=True)
    errors = [0.5, 0.1, 0.05]
    assert agg.run_metrics["prediction_mape"].update_count == 0  # no device op per step: handed over at once
    agg.update_run_metrics()
    assert float(agg.run_metrics["prediction_mape"].compute()) == pytest.approx(sum(errors) / 3, rel=1e-12)
    assert float(agg.run_metrics["prediction_worst_ape"].compute()) == pytest.approx(0.5, rel=1e-12)
    assert float(agg.run_metrics["actual_peak_bytes"].compute()) == 500


def test_bytes_beyond_float32_stay_exact() -> None:
    agg = MemoryStepAggregator().to("cpu")
    agg.micro_step(step(80 * 2**30 + 1, 1), predicted=-1)
    agg.optimizer_step()
    agg.update_run_metrics()
    assert int(agg.run_metrics["actual_peak_bytes"].compute()) == 80 * 2**30 + 1


def test_rows_and_logged_keys_from_every_rank() -> None:
    gathered = [[100, 50, -1, 1000, 500, 300, 110], [120, 60, -1, 1000, 400, 310, 90]]
    rows = MemoryStepAggregator.rows(gathered, step=3)
    assert [(row["step"], row["rank"]) for row in rows] == [(3, 0), (3, 1)]
    assert rows[1]["prediction_error"] == pytest.approx(prediction_error(90, 120))
    metrics = MemoryStepAggregator.metrics(rows, rank=1)
    assert metrics["memory/actual_peak_bytes"] == 120 and metrics["memory/actual_peak_bytes_max"] == 120
    assert metrics["memory/prediction_error_max"] == pytest.approx(-0.25)  # the largest magnitude, signed
    assert "memory/reserved_bytes" not in metrics and "memory/reserved_bytes_max" not in metrics  # CPU: none
    unpredicted = MemoryStepAggregator.rows([[100, 50, -1, 1000, 500, 300, -1]], step=1)
    assert unpredicted[0]["prediction_error"] is None
    keys = MemoryStepAggregator.metrics(unpredicted, rank=0)
    assert not any(key.startswith(("memory/predicted", "memory/prediction")) for key in keys)
