"""MemoryMonitor: logged keys at every step, prediction error vs the predictor's targets, the fit check, bad input.

ZeRO 1 and 3 run with 2 processes (one launch each of ``scripts/monitor_run.py``; the ZeRO-1 launch also carries the
BatchPlanner, see test_batch_planner.py), ZeRO 0 and 2 and a plain single device in this process, DDP with 2
processes. Accuracy: the claim of ``benchmarks/accuracy_targets.py`` (over by at most ``WORST_PCT``, under by at most
that plus the bf16 kernels' scratch), judged against the monitor's logged actual peak and, where this test counts
itself, against the counting allocator installed before the model is built. The first step is excluded: optimizer
states are created lazily at the first optimizer step, after that step's peak.
"""

import csv
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from accuracy_targets import error_pct, within_claim
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from monitor_launch import launch, planner_args
from tiny_llm import CausalLM, TextDataModule

from lightning_memopt import MemOptStrategy
from lightning_memopt.core.units import parse_bytes
from lightning_memopt.lightning.callbacks.memory_monitor import MemoryDoesNotFitError, MemoryMonitor
from lightning_memopt.measuring.memory import collect_garbage

SCRIPT = Path(__file__).parent / "scripts" / "monitor_run.py"
KEYS = ("memory/actual_peak_bytes", "memory/actual_peak_bytes_max", "memory/predicted_peak_bytes",
        "memory/predicted_peak_bytes_max", "memory/prediction_error", "memory/prediction_error_max",
        "memory/current_bytes", "memory/device_total_bytes", "memory/device_free_bytes", "memory/rss_bytes",
        "memory/rss_bytes_max", "memory/predicted/parameters", "memory/predicted/gradients",
        "memory/predicted/optimizer_states", "memory/predicted/activations", "memory/predicted/logits",
        "memory/predicted/buffers", "memory/predicted/cpu_offloaded")  # fmt: skip


def memory_rows(metrics_csv: "str | Path") -> list[dict[str, float]]:
    """The CSV logger's rows that hold the monitor's keys, with their values as floats."""
    with open(metrics_csv) as f:
        rows = [row for row in csv.DictReader(f) if row.get("memory/actual_peak_bytes")]
    return [{k: float(v) for k, v in row.items() if v != ""} for row in rows]


@pytest.fixture
def two_rank_run(tmp_path_factory):
    """``two_rank_run(*args)``: the rank JSONs of one 2-process run (launched once per session per args)."""
    return lambda *args: launch(tmp_path_factory, *args)


class AllocatorPeaks(pl.Callback):
    """Each training step's peak, counted by the counting allocator (installed at construction) above the bytes
    alive at construction: the judge, independent of the monitor and the predictor."""

    def __init__(self) -> None:
        from lightning_memopt.measuring.cpu_allocator import CPUAllocationCounter

        collect_garbage()  # an earlier fit's storages, freed now, would be taken off the shared count mid-run
        self.counter = CPUAllocationCounter()
        self.base = self.counter.current_bytes
        self.peaks: list[int] = []

    def on_train_batch_start(self, *args) -> None:
        self.counter.reset_peak()

    def on_train_batch_end(self, *args) -> None:
        self.peaks.append(self.counter.peak_bytes - self.base)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.counter.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.counter.close()  # a fit that fails in setup never reaches teardown: the process allocator goes back


def assert_within_claim(history: "list[dict]") -> None:
    """Every rank's steps from the second on: the monitor's prediction against its logged actual peak, at the claim
    (``benchmarks/accuracy_targets.py``; the runs are bf16-mixed)."""
    rows = [h for h in history if h["step"] >= 2]
    assert rows
    outside = [(h["step"], h["rank"], f"{error_pct(h['predicted_peak_bytes'], h['actual_peak_bytes']):+.3f} %")
               for h in rows if not within_claim(h["predicted_peak_bytes"], h["actual_peak_bytes"], "bf16-mixed")]
    assert not outside, outside


def fit(tmp_path: Path, strategy, monitor: MemoryMonitor, batch_size: int = 8, steps: int = 3, hidden: int = 256,
        callbacks: "list | None" = None, accumulate: int = 1) -> pl.Trainer:  # fmt: skip
    """A bf16-mixed fit of a tiny Llama with ``monitor`` and an :class:`AllocatorPeaks` (installed after the data,
    before the model: the text the batches are cut from is host data, not the step's)."""
    data = TextDataModule(batch_size=batch_size, seq_len=64)
    allocator = AllocatorPeaks()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        precision="bf16-mixed",
        max_steps=steps,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[monitor, allocator, *(callbacks or [])],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(CausalLM(hidden_size=hidden, num_layers=2), data)
    return trainer


def assert_run_statistics(metrics_csv: "str | Path", history: "list[dict]") -> None:
    """The torchmetrics statistics logged at the epoch's end are those of every rank's steps from the second on."""
    with open(metrics_csv) as f:
        rows = [row for row in csv.DictReader(f) if row.get("memory/run/prediction_mape")]
    assert len(rows) == 1  # one epoch
    errors = [abs(h["prediction_error"]) for h in history if h["step"] >= 2]
    # the metrics compute in float64; Lightning's result collection hands the logger the default dtype (float32)
    assert float(rows[0]["memory/run/prediction_mape"]) == pytest.approx(sum(errors) / len(errors), rel=1e-6)
    assert float(rows[0]["memory/run/prediction_worst_ape"]) == pytest.approx(max(errors), rel=1e-6)
    assert float(rows[0]["memory/run/actual_peak_bytes"]) == max(h["actual_peak_bytes"] for h in history)


def assert_keys_at_every_step(metrics_csv: "str | Path", steps: int) -> list[dict[str, float]]:
    rows = memory_rows(metrics_csv)
    assert [int(row["step"]) for row in rows] == list(range(1, steps + 1))
    for row in rows:
        missing = [key for key in KEYS if key not in row]
        assert not missing, missing
        assert row["memory/actual_peak_bytes"] > 0 and row["memory/predicted_peak_bytes"] > 0
        assert row["memory/actual_peak_bytes_max"] >= row["memory/actual_peak_bytes"]
    return rows


# ---------------------------------------------------------------------------------------------------- 2 processes
def _launch_args(name: str) -> tuple[str, ...]:
    return planner_args() if name == "zero1" else ("--zero", name.removeprefix("zero"))


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["zero0", pytest.param("zero1", marks=pytest.mark.slow),
                                  pytest.param("zero2", marks=pytest.mark.slow), "zero3"])  # fmt: skip
def test_two_ranks_memopt_log_the_keys_at_every_step_gathered_over_ranks(two_rank_run, name):
    ranks = two_rank_run(*_launch_args(name))
    assert len(ranks) == 2
    rows = assert_keys_at_every_step(ranks[0]["metrics_csv"], ranks[0]["global_step"])
    history = ranks[0]["history"]  # rank zero holds every rank's gathered values
    assert sorted({row["rank"] for row in history}) == [0, 1]
    for row in rows:  # the max-over-ranks keys are the gathered maxima
        same_step = [h for h in history if h["step"] == int(row["step"])]
        assert row["memory/actual_peak_bytes_max"] == max(h["actual_peak_bytes"] for h in same_step)
        assert row["memory/actual_peak_bytes"] == next(
            h["actual_peak_bytes"] for h in same_step if h["rank"] == 0
        )
    assert_run_statistics(ranks[0]["metrics_csv"], history)
    assert Path(ranks[0]["plot"]).stat().st_size > 1000  # the PNG
    assert [row["rank"] for row in ranks[0]["summary"]] == [0, 1]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name",
    ["zero0", "zero1", "zero2", "zero3"],
)
def test_two_ranks_memopt_prediction_error_within_the_predictor_target(two_rank_run, name):
    history = two_rank_run(*_launch_args(name))[0]["history"]
    assert_within_claim(history)


@pytest.mark.distributed
@pytest.mark.slow  # a 2-process DDP fit (18 s); the MemOpt stages cover the gathering in `make test`
def test_ddp_two_ranks_logs_every_step(two_rank_run):
    ranks = two_rank_run("--strategy", "ddp")
    assert_keys_at_every_step(ranks[0]["metrics_csv"], ranks[0]["global_step"])
    assert_run_statistics(ranks[0]["metrics_csv"], ranks[0]["history"])  # synchronised over both ranks
    assert [row["rank"] for row in ranks[0]["summary"]] == [0, 1]
    assert ranks[0]["history"][0]["predicted_peak_bytes"] > 0


@pytest.mark.distributed
def test_ddp_prediction_error_within_the_predictor_target(two_rank_run):
    ranks = two_rank_run("--strategy", "ddp")
    assert_within_claim(ranks[0]["history"])


# ---------------------------------------------------------------------------------------------------- 1 process
@pytest.mark.parametrize("zero", [0, 2, 3])
def test_single_process_memopt_stages_within_the_predictor_target(tmp_path, zero):
    """At ZeRO-3 the micro-batch makes the backward the peak, where one rank holds no gathered copy of a parameter
    (its data is its partition: counted, the prediction was 3.5 % over)."""
    monitor = MemoryMonitor(log_every_n_steps=1)
    trainer = fit(tmp_path, MemOptStrategy(zero=zero), monitor, batch_size=30 if zero == 3 else 8)
    assert zero != 3 or monitor.estimate.details["peak_phase"] == "backward"
    assert_keys_at_every_step(Path(trainer.log_dir) / "metrics.csv", 3)
    assert_run_statistics(Path(trainer.log_dir) / "metrics.csv", monitor.history)
    assert_within_claim(monitor.history)
    # the judge: the counting allocator, installed before the model was built, by code the predictor does not share
    allocator = next(c for c in trainer.callbacks if isinstance(c, AllocatorPeaks))
    assert len(allocator.peaks) == 3
    for measured in allocator.peaks[1:]:
        assert within_claim(monitor.estimate.total, measured, "bf16-mixed"), error_pct(monitor.estimate.total, measured)
    summary = monitor.summary()
    assert len(summary) == 1 and summary[0]["actual_peak_bytes"] == max(
        h["actual_peak_bytes"] for h in monitor.history
    )


def test_single_device_without_memopt_logs_at_every_nth_step(tmp_path):
    monitor = MemoryMonitor(log_every_n_steps=2)
    trainer = fit(tmp_path, "auto", monitor, steps=4, batch_size=4)
    rows = memory_rows(Path(trainer.log_dir) / "metrics.csv")
    assert [int(row["step"]) for row in rows] == [2, 4]
    assert monitor.estimate.details["engine"] == "torch"
    assert monitor.estimate.details["micro_batch_size"] == 4
    assert (Path(trainer.log_dir) / "memory_monitor.png").exists()


def test_a_model_it_cannot_predict_trains_with_one_warning_and_the_actual_memory(tmp_path):
    """A step that reads an activation's data outside torch cannot be traced: the monitor says so once, skips the
    fit check and logs the actual memory; the run is not stopped."""

    class Routed(CausalLM):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.seen = loss.detach().float().numpy()  # a traced (fake) tensor has no data
            return loss

    monitor = MemoryMonitor(log_every_n_steps=1, device_memory=1)  # 1 byte: a fit check would fail the run
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=CSVLogger(tmp_path, name="run"),
                         callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    with pytest.warns(UserWarning, match="MemoryMonitor cannot predict the memory of Routed"):
        trainer.fit(Routed(hidden_size=64, num_layers=2), TextDataModule(batch_size=2, seq_len=16))
    assert trainer.global_step == 2 and monitor.estimate is None
    rows = memory_rows(Path(trainer.log_dir) / "metrics.csv")
    assert len(rows) == 2 and all(row["memory/actual_peak_bytes"] > 0 for row in rows)
    assert not any("memory/predicted_peak_bytes" in row for row in rows)
    assert [row["prediction_error"] for row in monitor.summary()] == [None]


def test_a_run_that_does_not_fit_fails_before_the_first_step_and_the_first_suggestion_fixes_it(tmp_path):
    from lightning_memopt.lightning.callbacks.transforms import ActivationCheckpointing

    with pytest.raises(MemoryDoesNotFitError) as info:  # 1 byte: fails at setup, and says what it predicts
        fit(tmp_path / "probe", MemOptStrategy(zero=0), MemoryMonitor(device_memory=1), batch_size=16)
    predicted = info.value.estimate.total
    device_memory = int(predicted * 0.8 / 0.9)  # the budget is 80 % of the prediction

    seen_steps = []

    class CountSteps(pl.Callback):
        def on_train_batch_start(self, *args) -> None:
            seen_steps.append(1)

    with pytest.raises(MemoryDoesNotFitError) as info:
        fit(tmp_path / "fail", MemOptStrategy(zero=0), MemoryMonitor(device_memory=device_memory), batch_size=16,
            callbacks=[CountSteps()])  # fmt: skip
    assert not seen_steps  # failed before the first step
    message, fixes = str(info.value), info.value.suggestions
    assert "optimizer_states" in message and "activations" in message  # the breakdown
    assert fixes and fixes[0].fits and fixes[0].predicted_total <= device_memory * 0.9
    assert all(not fix.kwargs_change.get("liger") for fix in fixes)  # Liger needs CUDA: not suggested on CPU
    assert f"1. {fixes[0].description}" in message

    change = dict(fixes[0].kwargs_change)  # follow the first suggestion, whatever it is
    batch_size, accumulate, callbacks = 16, 1, []
    if "micro_batch_size" in change:
        batch_size, accumulate = change.pop("micro_batch_size"), change.pop("accumulate_grad_batches")
        assert change.pop("accumulate_grad_batches_factor") == accumulate  # from accumulate_grad_batches=1
    if change.pop("activation_checkpointing", False):
        callbacks.append(ActivationCheckpointing())
    strategy = MemOptStrategy(zero=change.pop("zero", 0), offload_optimizer=change.pop("offload_optimizer", False),
                              offload_parameters=change.pop("offload_parameters", False))  # fmt: skip
    assert not change, f"a suggestion this test cannot follow: {change}"
    monitor = MemoryMonitor(device_memory=device_memory, log_every_n_steps=1)
    trainer = fit(tmp_path / "fixed", strategy, monitor, batch_size=batch_size, accumulate=accumulate,
                  callbacks=callbacks, steps=2)  # fmt: skip
    assert trainer.global_step == 2
    assert monitor.estimate.total <= device_memory * 0.9
    assert max(h["actual_peak_bytes"] for h in monitor.history) <= device_memory
    if (
        callbacks
    ):  # the checkpointing callback ran after the monitor's setup: the prediction waited and includes it
        assert monitor.estimate.details["checkpointed_blocks"] == 2


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"margin": -0.1}, "margin"),
        ({"margin": 1.0}, "margin"),
        ({"device_memory": "lots"}, "device_memory"),
        ({"device_memory": 0}, "positive"),
        ({"optimizer": "lion"}, "optimizer"),
        ({"method": "guess"}, "method"),
        ({"cpu_mode": "profiler"}, "cpu_mode"),
        ({"snapshot_on_oom": "stacks"}, "Expected `snapshot_on_oom` True, False or 'frames', got 'stacks'"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryMonitor(**kwargs)


def test_no_logger_raises_in_setup(tmp_path):
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=1, callbacks=[MemoryMonitor()],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    with pytest.raises(MisconfigurationException, match="logger"):
        trainer.fit(CausalLM(hidden_size=32, num_layers=1), TextDataModule(batch_size=2, seq_len=16))


def test_device_memory_accepts_units():
    assert MemoryMonitor(device_memory="24GiB").device_memory == parse_bytes("24GiB")


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_out_of_memory_writes_a_snapshot_and_reraises(tmp_path, capsys):
    class Greedy(CausalLM):
        def training_step(self, batch, batch_idx):
            free, _ = torch.cuda.mem_get_info()
            torch.empty(2 * free, dtype=torch.uint8, device=self.device)  # more than the device has
            return super().training_step(batch, batch_idx)

    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=2, logger=CSVLogger(tmp_path),
                         default_root_dir=tmp_path, callbacks=[MemoryMonitor(fail_if_not_fits=False)],
                         enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip
    with pytest.raises(torch.OutOfMemoryError):
        trainer.fit(Greedy(hidden_size=64), TextDataModule(batch_size=4, seq_len=64))
    assert (tmp_path / "memory_snapshots" / "rank0.pickle").stat().st_size > 0
    assert "Predicted per rank" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["memopt_zero0", "lightning_deepspeed_stage2", "auto"])
def test_one_gpu_llama_logs_actual_vs_predicted(tmp_path, strategy):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategies = {"memopt_zero0": lambda: MemOptStrategy(zero=0), "auto": lambda: "auto",
                  "lightning_deepspeed_stage2": lambda: DeepSpeedStrategy(stage=2)}  # fmt: skip
    monitor = MemoryMonitor(log_every_n_steps=1)
    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy=strategies[strategy](), precision="bf16-mixed",
                         max_steps=4, logger=CSVLogger(tmp_path), callbacks=[monitor], enable_progress_bar=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(CausalLM(hidden_size=1024, num_layers=8), TextDataModule(batch_size=8, seq_len=256))
    rows = assert_keys_at_every_step(Path(trainer.log_dir) / "metrics.csv", 4)
    assert all(row["memory/reserved_bytes"] >= row["memory/actual_peak_bytes"] for row in rows)
    assert_within_claim(monitor.history)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_default_reads_the_allocator_and_device_stats_monitor_still_reads_sensible_peaks(tmp_path):
    """The default measures the device: the step's ``max_memory_allocated`` (reset at every step start, so
    DeviceStatsMonitor's peak key reads per-step peaks too, never above the run's) and the device's used memory."""
    from lightning.pytorch.callbacks import DeviceStatsMonitor

    monitor = MemoryMonitor(log_every_n_steps=1)
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=4, logger=CSVLogger(tmp_path),
                         log_every_n_steps=1, callbacks=[monitor, DeviceStatsMonitor()], enable_progress_bar=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(CausalLM(hidden_size=256, num_layers=2), TextDataModule(batch_size=8, seq_len=128))
    with open(Path(trainer.log_dir) / "metrics.csv") as f:
        key = next(k for k in csv.DictReader(f).fieldnames if k.endswith("allocated_bytes.all.peak"))
    with open(Path(trainer.log_dir) / "metrics.csv") as f:
        peaks = [float(row[key]) for row in csv.DictReader(f) if row.get(key)]
    run_peak = max(h["actual_peak_bytes"] for h in monitor.history)
    assert len(peaks) >= 4 and 0 < max(peaks) <= torch.cuda.max_memory_allocated()
    assert run_peak <= torch.cuda.max_memory_reserved()
    for h in monitor.history:  # the device's used memory holds the allocator's reserved bytes and the context
        assert h["reserved_bytes"] >= h["actual_peak_bytes"] > 0
        assert h["device_total_bytes"] - h["device_free_bytes"] > h["reserved_bytes"]


def test_progress_bar_shows_the_logged_step_peaks(tmp_path):
    monitor = MemoryMonitor(log_every_n_steps=1, progress_bar=True)
    trainer = fit(tmp_path, MemOptStrategy(zero=2), monitor, steps=2, accumulate=2)
    last = monitor.history[-1]
    bar = trainer.progress_bar_metrics
    assert bar["mem_MiB"] == pytest.approx(last["actual_peak_bytes"] / 2**20, rel=1e-6)
    assert bar["pred_MiB"] == pytest.approx(last["predicted_peak_bytes"] / 2**20, rel=1e-6)
    assert not any(key.startswith(("mem_", "pred_")) for key in trainer.logged_metrics)  # the bar only
    assert {f"predicted/{c}" for c in ("parameters", "activations")} <= set(last)  # the plot's bands (rank 0)
