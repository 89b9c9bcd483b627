"""MemoryMonitor: predicted vs actual per-device memory every step, a fit check before step one, an OOM report.

A thin callback, as Lightning's ``ThroughputMonitor``: it reads the run (the shared run reader), measures
(:class:`~lightning_memopt.measuring.memory.DeviceMemoryProbe`), hands each step to the Lightning-free
:class:`~lightning_memopt.measuring.memory_steps.MemoryStepAggregator`, gathers over ranks and logs.
"""

import functools
import subprocess
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_memopt._imports import _MATPLOTLIB_AVAILABLE, requires
from lightning_memopt.core.units import parse_bytes
from lightning_memopt.lightning._run_reader import ReadsRun, batch_shape, optimizer_name, read_run
from lightning_memopt.lightning.callbacks._memory_prediction import (
    FitPrediction,
    MemoryDoesNotFitError,
    default_device_memory,
    transforms_pending,
)
from lightning_memopt.lightning.callbacks._memory_report import (
    describe_fix,
    save_plot,
    summarize,
    summary_table,
    unit_for,
)
from lightning_memopt.measuring.memory import collect_garbage
from lightning_memopt.measuring.memory_steps import FIELDS, MemoryStepAggregator, storage_bytes
from lightning_memopt.predictor.report.estimate import CATEGORIES, MemoryEstimate

__all__ = ["MemoryDoesNotFitError", "MemoryMonitor"]

_MODES = ("dispatch", "allocator")


class MemoryMonitor(ReadsRun):
    r"""Log actual vs predicted memory of every rank's device during training; fail early when it cannot fit.

    In ``setup`` it predicts one rank's peak (:func:`~lightning_memopt.planning.estimate_memory`) from the run
    itself: the strategy (``MemOptStrategy``, Lightning's ``DeepSpeedStrategy``, DDP or a single device), the world
    size, the precision, the optimizer, what the ``lightning_memopt`` transforms applied, and the shape of the first
    training batch. Rank zero prints the breakdown; if the peak exceeds ``device_memory * (1 - margin)`` the run fails
    before its first step with the breakdown and ranked suggestions, each with its predicted peak. The prediction is
    refreshed in ``on_train_start`` (the real optimizer and DeepSpeed config) and whenever the batch shape changes.
    The batch and the optimizer come from the run reader the other callbacks and the strategy share: the training
    loader is built once and ``configure_optimizers`` called once per fit.

    Every step, each rank measures its device with
    :class:`~lightning_memopt.measuring.memory.DeviceMemoryProbe`. On CUDA the default (``cuda_mode="allocator"``) is
    what the device itself counts: the caching allocator's ``max_memory_allocated`` (the "actual" compared with the
    prediction) and ``max_memory_reserved`` of the step, and the device's used memory from
    ``torch.cuda.mem_get_info`` (what ``nvidia-smi`` shows: the CUDA context, NCCL and other processes too). The
    per-step peaks need ``torch.cuda.reset_peak_memory_stats`` at every step start, which is process-wide:
    ``DeviceStatsMonitor``'s ``*.peak`` keys and a user's own ``max_memory_allocated`` then read per-step peaks, which
    the monitor's ``memory/actual_peak_bytes_max`` and ``memory/run/actual_peak_bytes`` turn back into the run's.
    ``cuda_mode="dispatch"`` counts the tensor storages every op returns with a ``TorchDispatchMode`` instead (what
    the predictor traces: an explanation of where the bytes are, slower, blind to workspaces and the allocator; it
    leaves the CUDA statistics alone). On CPU the default (``cpu_mode="allocator"``) installs a counting CPU
    allocator for the fit (compiled once with the system C++ compiler; where none is found the monitor warns once
    and counts live tensors instead); ``cpu_mode="dispatch"`` is the tracker. On either device the live
    bytes that were in the process before ``setup`` and are not the model's (an earlier run's objects) are not
    counted. The process RSS is reported too. At every ``log_every_n_steps``-th optimizer step the values are
    gathered from all ranks (one ``all_gather`` of 7 numbers) and logged through the Trainer's loggers; the peaks are
    the maxima over the steps since the last log.

    Logged keys (bytes unless noted; the unsuffixed ones are rank zero's, ``*_max`` the maximum over ranks):

    - ``memory/actual_peak_bytes``, ``memory/actual_peak_bytes_max``
    - ``memory/predicted_peak_bytes``, ``memory/predicted_peak_bytes_max``
    - ``memory/prediction_error``: ``(predicted - actual) / actual`` (signed, relative; > 0 over-predicts), and
      ``memory/prediction_error_max``: the rank's error with the largest magnitude (signed)
    - ``memory/current_bytes``: live bytes at the end of the step
    - ``memory/reserved_bytes``, ``memory/reserved_bytes_max``: the caching allocator's reserved bytes (CUDA only):
      its peak during the step with ``cuda_mode="allocator"``, at the end of the step with ``"dispatch"``
    - ``memory/predicted_reserved_bytes``, ``memory/predicted_device_bytes``: the predicted reserved peak and device
      total (reserved + CUDA context), when predicted (CUDA, the plain engine on one device)
    - ``memory/device_total_bytes``, ``memory/device_free_bytes``: the device (CPU: system memory)
    - ``memory/rss_bytes``, ``memory/rss_bytes_max``: the process resident set size
    - ``memory/predicted/<category>`` for ``parameters``, ``gradients``, ``optimizer_states``, ``activations``,
      ``logits``, ``buffers`` (the predicted breakdown at the peak) and ``memory/predicted/cpu_offloaded``
    - at the end of every training epoch, over its optimizer steps and all ranks (torchmetrics metrics logged through
      ``LightningModule.log``, synchronised over the ranks): ``memory/run/prediction_mape`` (mean absolute
      percentage error of the predicted peak, a fraction), ``memory/run/prediction_worst_ape`` (its largest absolute
      relative error) and ``memory/run/actual_peak_bytes`` (the highest peak). The error statistics leave out the
      fit's first optimizer step, whose optimizer states are created after its peak.

    With ``accumulate_grad_batches > 1`` the prediction includes what the engine keeps between micro-steps; the
    first (or lone) micro-batch of an accumulation window is compared with the prediction without accumulation.

    On a CPU device the predicted peak compared is ``total + cpu_offloaded`` (offloaded states live in the same
    memory). At the end of fit rank zero prints a summary per rank (on CUDA with reserved and the device's used memory
    beside their predictions) and, with matplotlib, saves ``memory_monitor.png`` (the predicted breakdown stacked per
    logged step, each rank's actual peak over it, on CUDA rank zero's reserved and used memory with their predictions,
    the device line) in ``trainer.log_dir`` and prints its path. With ``progress_bar=True`` the progress bar shows rank
    zero's actual and predicted peak at every optimizer step, the maxima since the last log as they are logged
    (``mem_MiB`` / ``pred_MiB``, or ``_GiB``; with ``log_every_n_steps=1``: the step's own). On CUDA out-of-memory it
    writes PyTorch's memory snapshot (``memory_snapshots/rank<r>.pickle`` under ``default_root_dir``; open it at
    https://pytorch.org/memory_viz), prints the prediction and suggestions; Lightning re-raises the error.

    Args:
        log_every_n_steps: log every this many optimizer steps (``None``: the Trainer's ``log_every_n_steps``).
        device_memory: one device's memory, bytes or a string like ``"80GiB"``; ``None``: the CUDA device's total
            memory, or on CPU the system memory divided by the processes on this machine.
        margin: fraction of the device kept free by the fit check, in [0, 1).
        fail_if_not_fits: raise before the first step when the prediction does not fit (else a warning).
        plot: save the PNG at the end of fit; ``None``: when matplotlib is installed.
        snapshot_on_oom: record the CUDA allocation history and dump it on out-of-memory (CUDA only): ``True`` every
            segment, block and allocation event with its size; ``"frames"`` also the Python frames of every
            allocation (a stack walk per allocation: measured +1.2 % and +2.7 % of a 125 ms step of a 1B model on an
            H200); ``False``: nothing recorded.
        optimizer: the predictor's optimizer name (``"adamw"``, ``"sgd-momentum"``, ...); ``None``: read from the
            run (the ``configure_optimizers`` result the Trainer then uses).
        method: the predictor's method, ``"trace"`` (the only one: a fake-tensor trace of the module's own step).
        cpu_mode: how CPU memory is counted, ``"allocator"`` (default) or ``"dispatch"`` (see above).
        cuda_mode: how CUDA memory is counted, ``"allocator"`` (default) or ``"dispatch"`` (see above).
        max_suggestions: at most this many suggestions in the fit-check error.
        progress_bar: show the actual and predicted peak in the progress bar at every optimizer step (not logged).

    Raises:
        ValueError: for ``log_every_n_steps < 1``, a margin outside [0, 1), an unparsable ``device_memory``, an
            unknown ``optimizer``, ``method``, ``cpu_mode``, ``cuda_mode`` or ``snapshot_on_oom``.
        ModuleNotFoundError: ``plot=True`` without matplotlib.
        MisconfigurationException: in ``setup``, with ``Trainer(logger=False)`` or an unsupported strategy.
        MemoryDoesNotFitError: before the first step, when the predicted peak does not fit.

    Example:
        >>> monitor = MemoryMonitor(device_memory="24GiB", margin=0.1, plot=False)
        >>> monitor.device_memory
        25769803776
        >>> MemoryMonitor(margin=1.0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `margin` in [0, 1), got 1.0. Fix: e.g. margin=0.1 keeps 10 % of the device free.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        device_memory: "int | float | str | None" = None,
        margin: float = 0.1,
        fail_if_not_fits: bool = True,
        plot: bool | None = None,
        snapshot_on_oom: "bool | str" = True,
        optimizer: str | None = None,
        method: str = "trace",
        cpu_mode: str = "allocator",
        max_suggestions: int = 5,
        progress_bar: bool = False,
        cuda_mode: str = "allocator",
    ) -> None:
        if log_every_n_steps is not None and (
            not isinstance(log_every_n_steps, int) or isinstance(log_every_n_steps, bool) or log_every_n_steps < 1
        ):
            raise ValueError(f"Expected `log_every_n_steps` to be an int >= 1 or None, got {log_every_n_steps!r}.")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= margin < 1.0:
            raise ValueError(
                f"Expected `margin` in [0, 1), got {margin!r}. Fix: e.g. margin=0.1 keeps 10 % of the device free."
            )
        try:
            self.device_memory = None if device_memory is None else parse_bytes(device_memory)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"Expected `device_memory` like '80GiB' or a number of bytes, got {device_memory!r}. {err}"
            ) from err
        if self.device_memory == 0:
            raise ValueError("Expected a positive `device_memory`, got 0. Fix: e.g. device_memory='80GiB'.")
        if optimizer is not None:
            from lightning_memopt.predictor.request import resolve_optimizer

            resolve_optimizer(optimizer)
        if method != "trace":
            raise ValueError(
                f"Expected `method='trace'`, got {method!r}: the closed-form ('analytic') formulas were removed; the"
                " trace of the module's own step is exact for any model. Fix: drop `method`."
            )
        for name, mode in (("cpu_mode", cpu_mode), ("cuda_mode", cuda_mode)):
            if mode not in _MODES:
                raise ValueError(f"Expected `{name}` 'dispatch' or 'allocator', got {mode!r}.")
        if snapshot_on_oom not in (True, False, "frames"):
            raise ValueError(f"Expected `snapshot_on_oom` True, False or 'frames', got {snapshot_on_oom!r}."
                             " Fix: 'frames' records each allocation's Python frames too.")  # fmt: skip
        if plot:
            requires(_MATPLOTLIB_AVAILABLE, "MemoryMonitor(plot=True)", "plot")
        self.log_every_n_steps = log_every_n_steps
        self.margin = float(margin)
        self.fail_if_not_fits = fail_if_not_fits
        self.plot = bool(_MATPLOTLIB_AVAILABLE) if plot is None else plot
        self.snapshot_on_oom = snapshot_on_oom
        self.optimizer = optimizer
        self.method = method
        self.cpu_mode, self.cuda_mode = cpu_mode, cuda_mode
        self.max_suggestions = max_suggestions
        self.progress_bar = progress_bar
        #: rows ``{"step", "rank", <gathered fields>, "prediction_error"}`` of every logged step (all ranks on rank 0).
        self.history: list[dict[str, Any]] = []
        self._reset_run_state()

    def _reset_run_state(self) -> None:  # the state of one fit
        self._probe: Any = None
        self._agg = MemoryStepAggregator()
        self._pred = FitPrediction(self.device_memory or 0, self.margin, self.fail_if_not_fits, self.max_suggestions)
        self._last_global_step = 0
        self._optimizer_steps = 0
        self._recording = False

    @property
    def estimate(self) -> MemoryEstimate | None:
        """The current prediction (``None`` before setup, or when the model cannot be predicted)."""
        return self._pred.estimate

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._setup(trainer, pl_module)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        self._before_step(trainer, pl_module, batch)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._after_step(trainer)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._log_run_metrics(pl_module)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._finish(trainer)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._report_oom(trainer, exception)
        self._close()
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._close()
        super().teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------ setup and prediction
    def _setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.loggers:
            raise MisconfigurationException(
                "Expected a logger for `MemoryMonitor`, got `Trainer(logger=False)`. Fix: pass a logger, e.g."
                " `Trainer(logger=CSVLogger('logs'))`, or drop the callback."
            )
        from lightning_memopt.lightning._run_reader import strategy_settings
        from lightning_memopt.measuring.memory import record_cuda_memory_history

        self._reset_run_state()
        self.history = []
        strategy_settings(trainer.strategy, pl_module)  # raises early for an unsupported strategy
        device = trainer.strategy.root_device
        self._pred.device_memory = self.device_memory or default_device_memory(trainer, device)
        # created before the engine allocates, so that what it allocates is counted
        self._probe = self._new_probe(device)
        self._probe.start()
        self._probe.track(pl_module)
        # live bytes of the process that are not this run's (an earlier fit's objects): not the run's memory
        own = storage_bytes(pl_module, device.type)
        if self._probe.current_bytes > own:  # free an earlier run's unreachable objects before measuring
            collect_garbage()
        foreign = max(0, self._probe.current_bytes - own)
        self._agg = MemoryStepAggregator(foreign).to(device)
        if device.type == "cuda" and self.snapshot_on_oom:
            record_cuda_memory_history(True, frames=self.snapshot_on_oom == "frames")
            self._recording = True
        if is_overridden("configure_model", pl_module) or transforms_pending(trainer, pl_module):
            rank_zero_info("MemoryMonitor: the prediction waits for on_train_start (transforms or layers pending).")
            return
        run = read_run(trainer)
        self._pred.optimizer_name = self.optimizer or self._run_optimizer(pl_module, run.optimizer_name)
        shape = self._run_shape(run)
        if self._pred.optimizer_name is None or shape is None:
            rank_zero_info("MemoryMonitor: the prediction waits for on_train_start (optimizer or batch pending).")
            return
        if self._pred.predict(trainer, pl_module, shape):
            rank_zero_info(f"MemoryMonitor: predicted memory per rank\n{self._pred.table()}")
            self._pred.check_fit(trainer)

    def _new_probe(self, device: "torch.device") -> Any:
        """The device's probe; without a C++ compiler the CPU allocator mode degrades to the dispatch one (warned)."""
        from lightning_memopt.measuring.memory import DeviceMemoryProbe

        try:
            return DeviceMemoryProbe(device, cpu_mode=self.cpu_mode, cuda_mode=self.cuda_mode)
        except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as err:
            if device.type != "cpu" or self.cpu_mode != "allocator":
                raise
            rank_zero_warn(f"MemoryMonitor: the counting CPU allocator is not available ({type(err).__name__}: {err})"
                           "; counting live tensors instead (cpu_mode='dispatch').")  # fmt: skip
            return DeviceMemoryProbe(device, cpu_mode="dispatch", cuda_mode=self.cuda_mode)

    @staticmethod
    def _run_shape(run: Any) -> Any:
        try:
            return run.batch_shape()
        except Exception:  # a loader that cannot be built yet (e.g. needs the strategy); read at train start
            return None

    def _run_optimizer(self, pl_module: "pl.LightningModule", read: Any) -> str | None:
        try:
            return read()
        except MisconfigurationException as err:  # an optimizer the predictor does not know
            self._pred.unpredictable(pl_module, err)
            return None

    # ------------------------------------------------------------------ per step
    def _start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._probe is None:  # setup did not run for fit (e.g. the callback was added late)
            self._setup(trainer, pl_module)
        self._probe.track(trainer.strategy.model, pl_module, *trainer.optimizers)
        if trainer.optimizers and self.optimizer is None:
            read = functools.partial(optimizer_name, trainer.optimizers[0], trainer.strategy.root_device.type)
            self._pred.optimizer_name = self._run_optimizer(pl_module, read)
        shape = self._pred.shape or self._run_shape(read_run(trainer))
        if shape is not None and self._pred.optimizer_name is not None:
            self._pred.refresh()  # the resolved DeepSpeed config and the real optimizer
            if self._pred.predict(trainer, pl_module, shape) and not self._pred.checked:
                rank_zero_info(f"MemoryMonitor: predicted memory per rank\n{self._pred.table()}")
                self._pred.check_fit(trainer)
        self._last_global_step = trainer.global_step

    def _before_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        shape = batch_shape(batch)
        changed = shape is not None and shape != self._pred.shape and self._pred.optimizer_name is not None
        if changed and self._pred.predict(trainer, pl_module, shape, batch) and not self._pred.checked:
            self._pred.check_fit(trainer)
        self._probe.start_step()

    def _after_step(self, trainer: "pl.Trainer") -> None:
        first_micro_step, on_cpu = self._agg.micro_steps == 0, self._probe.device.type == "cpu"
        predicted = self._pred.peak(first_micro_step=first_micro_step, on_cpu=on_cpu)
        self._agg.micro_step(self._probe.end_step(), predicted)
        if trainer.global_step == self._last_global_step:
            return  # accumulating: no optimizer step yet
        self._agg.optimizer_step(compare=self._optimizer_steps > 0)
        self._optimizer_steps += 1
        pl_module = trainer.lightning_module
        if self.progress_bar:  # the peaks since the last log, as they are logged: rank zero's in the bar
            interval = self._agg.interval
            unit = unit_for(max(interval["predicted_peak_bytes"], interval["actual_peak_bytes"]))
            scale = 2**30 if unit == "GiB" else 2**20
            for key, name in ((f"mem_{unit}", "actual_peak_bytes"), (f"pred_{unit}", "predicted_peak_bytes")):
                if interval[name] >= 0:  # -1: no prediction
                    pl_module.log(key, interval[name] / scale, prog_bar=True, logger=False, on_step=True,
                                  on_epoch=False)  # fmt: skip
        self._last_global_step = trainer.global_step
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % every == 0:
            self._log(trainer)

    def _log_run_metrics(self, pl_module: "pl.LightningModule") -> None:
        """The epoch's steps into the run metrics, logged once (Lightning computes them, synced over the ranks)."""
        if self._probe is None:
            return
        self._agg.update_run_metrics()
        for name, metric in self._agg.run_metrics.items():
            if metric.update_count:
                pl_module.log(f"memory/run/{name}", metric, on_step=False, on_epoch=True,
                              metric_attribute=f"_memory_monitor_{name}")  # fmt: skip

    def _log(self, trainer: "pl.Trainer") -> None:
        local = torch.tensor(self._agg.take_interval(), dtype=torch.int64, device=trainer.strategy.root_device)
        gathered = trainer.strategy.all_gather(local).reshape(-1, len(FIELDS)).cpu().tolist()
        rows = MemoryStepAggregator.rows(gathered, trainer.global_step)
        self.history.extend(rows)
        metrics = MemoryStepAggregator.metrics(rows, trainer.global_rank)
        if self.estimate is not None:
            for key, value in (("reserved", self.estimate.reserved), ("device", self.estimate.device_total)):
                if value is not None:
                    metrics[f"memory/predicted_{key}_bytes"] = float(value)
                for row in rows:  # the summary's and the plot's
                    row[f"predicted_{key}_bytes"] = value
            for name in (*CATEGORIES, "cpu_offloaded"):
                metrics[f"memory/predicted/{name}"] = float(getattr(self.estimate, name))
                rows[trainer.global_rank][f"predicted/{name}"] = getattr(self.estimate, name)  # the plot's bands
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ end of fit, OOM
    def summary(self) -> list[dict[str, Any]]:
        """Per rank over the logged steps: the highest predicted and actual peaks, the error, reserved and device."""
        return summarize(self.history)

    def _finish(self, trainer: "pl.Trainer") -> None:
        log_dir = trainer.log_dir if self.plot else None  # a collective: every rank calls it
        if not trainer.is_global_zero or not self.history:
            return
        rank_zero_info("MemoryMonitor: peak memory per rank over the run\n" + summary_table(self.summary()))
        if self.plot and log_dir is not None:
            path = save_plot(self.history, Path(log_dir) / "memory_monitor.png", self._pred.device_memory, self.margin)
            rank_zero_info(f"MemoryMonitor: plot of predicted vs actual memory per rank saved to {path}")

    def _report_oom(self, trainer: "pl.Trainer", exception: BaseException) -> None:
        if not isinstance(exception, torch.OutOfMemoryError) or not torch.cuda.is_available():
            return
        from lightning_memopt.measuring.memory import dump_cuda_memory_snapshot

        parts = [f"MemoryMonitor: CUDA out of memory on rank {trainer.global_rank}."]
        if self.snapshot_on_oom and self._recording:
            path = Path(trainer.default_root_dir) / "memory_snapshots" / f"rank{trainer.global_rank}.pickle"
            parts.append(f"Memory snapshot: {dump_cuda_memory_snapshot(path)} (open it at https://pytorch.org/memory_viz)")
        if self.estimate is not None:
            parts.append(f"Predicted per rank:\n{self._pred.table()}")
            try:
                fixes = self._pred.suggestions(trainer)
            except Exception as err:  # never hide the OOM behind a second error
                fixes, parts = [], [*parts, f"(no suggestions: {err})"]
            parts.append("Suggestions (cheapest first):")
            parts += [f"  {i}. {describe_fix(fix)}" for i, fix in enumerate(fixes, 1)]
        print("\n".join(parts), flush=True)

    def _close(self) -> None:
        if self._probe is not None:
            self._probe.close()  # leaves the dispatch mode, puts the CPU allocator back
        if self._recording:
            from lightning_memopt.measuring.memory import record_cuda_memory_history

            record_cuda_memory_history(False)
            self._recording = False
