"""MemoryMonitor: predicted vs actual per-device memory every step, a fit check before step one, an OOM report."""

import gc
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_memopt._imports import _MATPLOTLIB_AVAILABLE, requires
from lightning_memopt.callbacks._memory_report import prediction_error, save_plot, summarize, summary_table
from lightning_memopt.callbacks._run_settings import (
    batch_shape,
    optimizer_from_module,
    optimizer_name,
    quiet_logging,
    run_settings,
)
from lightning_memopt.predictor.estimate import CATEGORIES, MemoryEstimate
from lightning_memopt.utilities.units import format_bytes, parse_bytes

#: What is gathered from every rank at a logged step, in this order.
_FIELDS = ("actual_peak_bytes", "current_bytes", "reserved_bytes", "device_total_bytes", "device_free_bytes",
           "rss_bytes", "predicted_peak_bytes")  # fmt: skip


class MemoryDoesNotFitError(MisconfigurationException):
    """The predicted peak exceeds the device memory minus the margin; carries the estimate and the suggestions.

    Attributes:
        estimate: the prediction that does not fit.
        suggestions: the ranked :class:`~lightning_memopt.planning.Suggestion` s, each with its prediction.
    """

    def __init__(self, message: str, estimate: MemoryEstimate, suggestions: list) -> None:
        super().__init__(message)
        self.estimate = estimate
        self.suggestions = suggestions


def _unit(num_bytes: int) -> str:
    return "GiB" if num_bytes >= 2**30 else "MiB"


def _describe(fix: Any) -> str:
    verdict = "fits" if fix.fits else "too large"
    return f"{fix.description} -> {format_bytes(fix.predicted_total, _unit(fix.predicted_total))} ({verdict})"


def _storage_bytes(module: Any) -> int:
    """Bytes of the distinct CPU storages of a module's tensors."""
    from lightning_memopt.utilities.tensor_walk import iter_tensors

    storages = {
        t.untyped_storage()._cdata: t.untyped_storage().nbytes()
        for t in iter_tensors(module)
        if t.device.type == "cpu"
    }
    return sum(storages.values())


class MemoryMonitor(Callback):
    r"""Log actual vs predicted memory of every rank's device during training; fail early when it cannot fit.

    In ``setup`` it predicts one rank's peak (:func:`~lightning_memopt.planning.estimate_memory`) from the run
    itself: the strategy (``MemOptStrategy``, Lightning's ``DeepSpeedStrategy``, DDP or a single device), the world
    size, the precision, the optimizer, what the ``lightning_memopt`` transforms applied, and the shape of the first
    training batch. Rank zero prints the breakdown; if the peak exceeds ``device_memory * (1 - margin)`` the run fails
    before its first step with the breakdown and ranked suggestions, each with its predicted peak. The prediction is
    refreshed in ``on_train_start`` (the real optimizer and DeepSpeed config) and whenever the batch shape changes.

    Every step, each rank measures its peak: CUDA ``max_memory_allocated`` / ``max_memory_reserved`` (reset every
    step) and ``mem_get_info``; CPU the peak of live tensor bytes, from a counting allocator
    (:class:`~lightning_memopt.utilities.memory.DeviceMemoryProbe`), less the live bytes that were in the process
    before ``setup`` and are not the model's (an earlier run's objects), and the process RSS. At every
    ``log_every_n_steps``-th optimizer step the values are gathered from all ranks (one ``all_gather`` of 7 numbers)
    and logged through the Trainer's loggers; the peaks are the maxima over the steps since the last log.

    Logged keys (bytes unless noted; the unsuffixed ones are rank zero's, ``*_max`` the maximum over ranks):

    - ``memory/actual_peak_bytes``, ``memory/actual_peak_bytes_max``
    - ``memory/predicted_peak_bytes``, ``memory/predicted_peak_bytes_max``
    - ``memory/prediction_error``: ``(predicted - actual) / actual`` (signed, relative; > 0 over-predicts), and
      ``memory/prediction_error_max``: the rank's error with the largest magnitude (signed)
    - ``memory/current_bytes``: live bytes at the end of the step
    - ``memory/reserved_bytes``, ``memory/reserved_bytes_max``: the caching allocator's peak (CUDA only)
    - ``memory/device_total_bytes``, ``memory/device_free_bytes``: the device (CPU: system memory)
    - ``memory/rss_bytes``, ``memory/rss_bytes_max``: the process resident set size
    - ``memory/predicted/<category>`` for ``parameters``, ``gradients``, ``optimizer_states``, ``activations``,
      ``logits``, ``buffers`` (the predicted breakdown at the peak) and ``memory/predicted/cpu_offloaded``

    With ``accumulate_grad_batches > 1`` the prediction includes what the engine keeps between micro-steps; a step
    made of a single micro-batch (the last, incomplete accumulation window of an epoch) is compared with the
    prediction without accumulation.

    On a CPU device the predicted peak compared is ``total + cpu_offloaded`` (offloaded states live in the same
    memory). At the end of fit rank zero prints a summary per rank and, with matplotlib, saves
    ``memory_monitor.png`` (the predicted breakdown stacked per logged step, each rank's actual peak over it, the
    device line) in ``trainer.log_dir`` and prints its path. With ``progress_bar=True`` the progress bar shows rank
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
        snapshot_on_oom: record the CUDA allocation history and dump it on out-of-memory (CUDA only).
        optimizer: the predictor's optimizer name (``"adamw"``, ``"sgd-momentum"``, ...); ``None``: read from the
            run (``configure_optimizers`` is called once in ``setup``, before the Trainer calls it).
        method: the predictor's method, ``"trace"`` (the only one: a fake-tensor trace of the module's own step).
        cpu_mode: the CPU probe's mode, ``"allocator"`` (default) or ``"dispatch"``.
        max_suggestions: at most this many suggestions in the fit-check error.
        progress_bar: show the actual and predicted peak in the progress bar at every optimizer step (not logged).

    Raises:
        ValueError: for ``log_every_n_steps < 1``, a margin outside [0, 1), an unparsable ``device_memory``, an
            unknown ``optimizer``, ``method`` or ``cpu_mode``.
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
        snapshot_on_oom: bool = True,
        optimizer: str | None = None,
        method: str = "trace",
        cpu_mode: str = "allocator",
        max_suggestions: int = 5,
        progress_bar: bool = False,
    ) -> None:
        if log_every_n_steps is not None and (
            not isinstance(log_every_n_steps, int)
            or isinstance(log_every_n_steps, bool)
            or log_every_n_steps < 1
        ):
            raise ValueError(
                f"Expected `log_every_n_steps` to be an int >= 1 or None, got {log_every_n_steps!r}."
            )
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
            from lightning_memopt.predictor.model_states import resolve_optimizer

            resolve_optimizer(optimizer)
        if method != "trace":
            raise ValueError(
                f"Expected `method='trace'`, got {method!r}: the closed-form ('analytic') formulas were removed; the"
                " trace of the module's own step is exact for any model. Fix: drop `method`."
            )
        if cpu_mode not in ("allocator", "dispatch"):
            raise ValueError(f"Expected `cpu_mode` 'allocator' or 'dispatch', got {cpu_mode!r}.")
        if plot:
            requires(_MATPLOTLIB_AVAILABLE, "MemoryMonitor(plot=True)", "plot")
        self.log_every_n_steps = log_every_n_steps
        self.margin = float(margin)
        self.fail_if_not_fits = fail_if_not_fits
        self.plot = bool(_MATPLOTLIB_AVAILABLE) if plot is None else plot
        self.snapshot_on_oom = snapshot_on_oom
        self.optimizer = optimizer
        self.method = method
        self.cpu_mode = cpu_mode
        self.max_suggestions = max_suggestions
        self.progress_bar = progress_bar
        #: the current prediction (``None`` before setup).
        self.estimate: MemoryEstimate | None = None
        #: rows ``{"step", "rank", <gathered fields>, "prediction_error"}`` of every logged step (all ranks on rank 0).
        self.history: list[dict[str, Any]] = []
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._probe: Any = None
        self._warned_unpredictable = False
        self._shape: Any = None
        self._optimizer_name: str | None = None
        self._estimates: dict[Any, tuple[MemoryEstimate, dict[str, Any]]] = {}
        self._kwargs: dict[str, Any] = {}
        self._checked = False
        self._budget_device = 0
        self._interval: dict[str, int] = {}
        self._last_global_step = 0
        self._micro_steps = 0  # micro-batches since the last optimizer step
        self._recording = False
        self._foreign = 0

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
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._finish(trainer)

    @override
    def on_exception(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException
    ) -> None:
        self._report_oom(trainer, exception)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._close()

    # ------------------------------------------------------------------ setup and prediction
    def _setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.loggers:
            raise MisconfigurationException(
                "Expected a logger for `MemoryMonitor`, got `Trainer(logger=False)`. Fix: pass a logger, e.g."
                " `Trainer(logger=CSVLogger('logs'))`, or drop the callback."
            )
        from lightning_memopt.callbacks._run_settings import strategy_settings
        from lightning_memopt.utilities.memory import DeviceMemoryProbe, record_cuda_memory_history

        self._reset_run_state()
        self.history = []
        strategy_settings(trainer.strategy, pl_module)  # raises early for an unsupported strategy
        device = trainer.strategy.root_device
        self._budget_device = self.device_memory or self._default_device_memory(trainer, device)
        # created before the engine allocates, so that the CPU allocator counts all of it
        self._probe = DeviceMemoryProbe(device, cpu_mode=self.cpu_mode)
        self._probe.start()
        if device.type == "cpu":
            # live bytes of the process that are not this run's (an earlier fit's objects) are not counted
            self._probe.track(pl_module)
            own = _storage_bytes(pl_module)
            if self._probe.current_bytes > own:  # free an earlier run's unreachable objects before measuring
                gc.collect()
            self._foreign = max(0, self._probe.current_bytes - own)
        if device.type == "cuda" and self.snapshot_on_oom:
            record_cuda_memory_history(True)
            self._recording = True
        self._optimizer_name = self.optimizer or optimizer_from_module(pl_module)
        batch = self._first_batch(trainer)
        shape = batch_shape(batch) if batch is not None else None
        deferred = (
            self._pending_transforms(trainer, pl_module) or self._optimizer_name is None or shape is None
        )
        if is_overridden("configure_model", pl_module):
            deferred = True  # its layers do not exist yet
        if deferred:
            rank_zero_info(
                "MemoryMonitor: the prediction waits for on_train_start (transforms, optimizer or batch pending)."
            )
            return
        if self._predict(trainer, pl_module, shape, batch):
            rank_zero_info(f"MemoryMonitor: predicted memory per rank\n{self.estimate.table(_unit(self.estimate.total))}")
            self._check_fit(trainer)

    @staticmethod
    def _default_device_memory(trainer: "pl.Trainer", device: torch.device) -> int:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        import psutil

        return int(psutil.virtual_memory().total // max(1, trainer.num_devices))

    @staticmethod
    def _first_batch(trainer: "pl.Trainer") -> Any:
        source = trainer.fit_loop._data_source
        if not source.is_defined():
            return None
        try:
            return next(iter(source.dataloader()))
        except Exception:  # noqa: BLE001 -- a loader that cannot be built yet (e.g. needs the strategy); predicted at train start
            return None

    @staticmethod
    def _pending_transforms(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> bool:
        from lightning_memopt.callbacks import transforms as transform_callbacks
        from lightning_memopt.transforms import applied_transforms

        applied = applied_transforms(pl_module)
        base = getattr(transform_callbacks, "_TransformCallback", ())
        return any(isinstance(cb, base) and cb._key not in applied for cb in trainer.callbacks)

    def _predict(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", shape: Any, batch: Any = None
    ) -> bool:
        """Predict for this batch shape (once per shape and optimizer); ``False`` when the model cannot be predicted,
        after one warning: the monitor then logs the actual memory only."""
        from lightning_memopt.planning.estimate import estimate_memory

        key = (shape, self._optimizer_name)
        if key not in self._estimates:
            if batch is None:
                batch = self._first_batch(trainer)
            kwargs = run_settings(trainer, pl_module, shape, self._optimizer_name or "adamw")
            kwargs.update(model=pl_module, example_batch=batch)
            try:
                with quiet_logging(pl_module):
                    self._estimates[key] = (estimate_memory(**kwargs), kwargs)
            except Exception as err:  # noqa: BLE001 -- a callback never ends the run it observes
                self._unpredictable(pl_module, err)
                return False
        self.estimate, self._kwargs = self._estimates[key]
        self._shape = shape
        return True

    def _unpredictable(self, pl_module: "pl.LightningModule", err: BaseException) -> None:
        self.estimate = None
        if not self._warned_unpredictable:
            self._warned_unpredictable = True
            rank_zero_warn(
                f"MemoryMonitor cannot predict the memory of {type(pl_module).__name__}: {type(err).__name__}: {err}"
                " It logs the actual memory only, and the fit check is skipped. Fix: what the error says, or"
                " report the model at the project's issue tracker."
            )

    def _predicted_peak(self) -> int:
        est = self.estimate
        if est is None:
            return -1  # no prediction: the predicted keys are not logged
        if self._micro_steps <= 1 and self._kwargs.get("accumulate_grad_batches", 1) > 1:
            est = self._first_micro_step_estimate()
        on_cpu = self._probe is not None and self._probe.device.type == "cpu"
        return est.total + (est.cpu_offloaded if on_cpu else 0)

    def _first_micro_step_estimate(self) -> MemoryEstimate:
        """The estimate of a micro-step that holds no earlier micro-step's gradients: the first of an accumulation
        window, or a lone one (the last, incomplete window of an epoch steps after one micro-batch)."""
        from lightning_memopt.planning.estimate import estimate_memory

        key = (self._shape, self._optimizer_name, "first micro-step")
        if key not in self._estimates:
            kwargs = dict(self._kwargs, accumulate_grad_batches=1)
            with quiet_logging(kwargs["model"]):
                self._estimates[key] = (estimate_memory(**kwargs), kwargs)
        return self._estimates[key][0]

    def _suggestions(self, trainer: "pl.Trainer") -> list:
        from lightning_memopt.planning.plan import suggest_fixes

        kwargs = dict(self._kwargs)
        zero_config = None
        if kwargs.get("engine") == "torch":  # a ZeRO suggestion means MemOptStrategy, with its "auto" bucket sizes
            from lightning_memopt.strategies.deepspeed_config import (
                apply_bucket_sizes,
                auto_bucket_sizes,
                infer_hidden_size,
            )

            module = trainer.lightning_module
            largest = max((p.numel() for p in module.parameters()), default=0)
            zero_config = {}
            apply_bucket_sizes(zero_config, auto_bucket_sizes(infer_hidden_size(module), largest))
        with quiet_logging(trainer.lightning_module):
            return suggest_fixes(
                kwargs,
                self._budget_device,
                self.margin,
                max_suggestions=self.max_suggestions,
                cuda=trainer.strategy.root_device.type == "cuda",  # Liger's Triton kernels need a CUDA GPU
                zero_config=zero_config,
            )

    def _check_fit(self, trainer: "pl.Trainer") -> None:
        self._checked = True
        est = self.estimate
        budget = int(self._budget_device * (1.0 - self.margin))
        if est is None or est.total <= budget:
            if est is not None:
                unit = _unit(self._budget_device)
                rank_zero_info(f"MemoryMonitor: fits: predicted peak {format_bytes(est.total, unit)} <= budget"
                               f" {format_bytes(budget, unit)} ({format_bytes(self._budget_device, unit)} with"
                               f" {self.margin:.0%} kept free)")  # fmt: skip
            return
        fixes = self._suggestions(trainer)
        unit = _unit(self._budget_device)
        lines = [f"  {i}. {_describe(fix)}" for i, fix in enumerate(fixes, 1)] or ["  (none found)"]
        message = (
            f"Expected the predicted peak per rank to fit in {format_bytes(budget, unit)} ({format_bytes(self._budget_device, unit)}"
            f" with {self.margin:.0%} kept free), got {format_bytes(est.total, unit)}.\n{est.table(unit)}\n"
            "Fix: one of these changes (cheapest first), each with its predicted peak:\n" + "\n".join(lines)
        )
        if self.fail_if_not_fits:
            raise MemoryDoesNotFitError(message, est, fixes)
        rank_zero_warn(message)

    # ------------------------------------------------------------------ per step
    def _start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._probe is None:  # setup did not run for fit (e.g. the callback was added late)
            self._setup(trainer, pl_module)
        self._probe.track(trainer.strategy.model, pl_module, *trainer.optimizers)
        if trainer.optimizers and self.optimizer is None:
            try:
                self._optimizer_name = optimizer_name(trainer.optimizers[0])
            except MisconfigurationException as err:
                self._unpredictable(pl_module, err)
        shape = self._shape or batch_shape(self._first_batch(trainer))
        if shape is not None and self._optimizer_name is not None:
            self._estimates.clear()  # the resolved DeepSpeed config and the real optimizer
            if self._predict(trainer, pl_module, shape) and not self._checked:
                rank_zero_info(f"MemoryMonitor: predicted memory per rank\n{self.estimate.table(_unit(self.estimate.total))}")
                self._check_fit(trainer)
        self._last_global_step = trainer.global_step

    def _before_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        shape = batch_shape(batch)
        if shape is not None and shape != self._shape and self._optimizer_name is not None:
            if self._predict(trainer, pl_module, shape, batch) and not self._checked:
                self._check_fit(trainer)
        self._micro_steps += 1
        self._probe.start_step()

    def _after_step(self, trainer: "pl.Trainer") -> None:
        step = self._probe.end_step()
        values = {
            "actual_peak_bytes": step.peak_bytes - self._foreign,
            "current_bytes": step.current_bytes - self._foreign,
            "reserved_bytes": -1 if step.reserved_bytes is None else step.reserved_bytes,
            "device_total_bytes": step.device_total,
            "device_free_bytes": step.device_free,
            "rss_bytes": step.rss_bytes,
            "predicted_peak_bytes": self._predicted_peak(),
        }
        for (
            name,
            value,
        ) in values.items():  # maxima over the steps since the last log (the last value for the rest)
            keep_max = name in ("actual_peak_bytes", "reserved_bytes", "rss_bytes", "predicted_peak_bytes")
            self._interval[name] = max(self._interval.get(name, value), value) if keep_max else value
        if trainer.global_step == self._last_global_step:
            return  # accumulating: no optimizer step yet
        if self.progress_bar:  # the peaks since the last log, as they are logged: rank zero's in the bar
            unit = _unit(max(self._interval["predicted_peak_bytes"], self._interval["actual_peak_bytes"]))
            scale = 2**30 if unit == "GiB" else 2**20
            for key, name in ((f"mem_{unit}", "actual_peak_bytes"), (f"pred_{unit}", "predicted_peak_bytes")):
                if self._interval[name] >= 0:  # -1: no prediction
                    trainer.lightning_module.log(key, self._interval[name] / scale, prog_bar=True, logger=False,
                                                 on_step=True, on_epoch=False)  # fmt: skip
        self._last_global_step = trainer.global_step
        self._micro_steps = 0
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % every == 0:
            self._log(trainer)

    def _log(self, trainer: "pl.Trainer") -> None:
        local = torch.tensor(
            [self._interval[name] for name in _FIELDS], dtype=torch.int64, device=trainer.strategy.root_device
        )
        self._interval = {}
        gathered = trainer.strategy.all_gather(local).reshape(-1, len(_FIELDS)).cpu().tolist()
        rows = []
        for rank, values in enumerate(gathered):
            row: dict[str, Any] = {"step": trainer.global_step, "rank": rank, **dict(zip(_FIELDS, values))}
            predicted = row["predicted_peak_bytes"]  # -1: no prediction on that rank
            row["prediction_error"] = prediction_error(predicted, row["actual_peak_bytes"]) if predicted >= 0 else None
            rows.append(row)
        self.history.extend(rows)
        def known(name: str, value: Any) -> bool:  # reserved (CPU) and the prediction (none) may be missing
            return value is not None and not (name in ("reserved_bytes", "predicted_peak_bytes") and value < 0)

        metrics = {f"memory/{name}": float(value) for name, value in rows[trainer.global_rank].items()
                   if name not in ("step", "rank") and known(name, value)}  # fmt: skip
        for name in ("actual_peak_bytes", "predicted_peak_bytes", "reserved_bytes", "rss_bytes"):
            if rows[0][name] >= 0:
                metrics[f"memory/{name}_max"] = float(max(row[name] for row in rows))
        errors = [row["prediction_error"] for row in rows if row["prediction_error"] is not None]
        if errors:
            metrics["memory/prediction_error_max"] = max(errors, key=abs)
        if self.estimate is not None:
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
            path = save_plot(self.history, Path(log_dir) / "memory_monitor.png", self._budget_device, self.margin)
            rank_zero_info(f"MemoryMonitor: plot of predicted vs actual memory per rank saved to {path}")

    def _report_oom(self, trainer: "pl.Trainer", exception: BaseException) -> None:
        if not isinstance(exception, torch.OutOfMemoryError) or not torch.cuda.is_available():
            return
        from lightning_memopt.utilities.memory import dump_cuda_memory_snapshot

        parts = [f"MemoryMonitor: CUDA out of memory on rank {trainer.global_rank}."]
        if self.snapshot_on_oom and self._recording:
            path = Path(trainer.default_root_dir) / "memory_snapshots" / f"rank{trainer.global_rank}.pickle"
            parts.append(
                f"Memory snapshot: {dump_cuda_memory_snapshot(path)} (open it at https://pytorch.org/memory_viz)"
            )
        if self.estimate is not None:
            parts.append(f"Predicted per rank:\n{self.estimate.table(_unit(self.estimate.total))}")
            try:
                fixes = self._suggestions(trainer)
            except Exception as err:  # noqa: BLE001 -- never hide the OOM behind a second error
                fixes, parts = [], parts + [f"(no suggestions: {err})"]
            parts += ["Suggestions (cheapest first):"] + [
                f"  {i}. {_describe(fix)}" for i, fix in enumerate(fixes, 1)
            ]
        print("\n".join(parts), flush=True)

    def _close(self) -> None:
        if self._probe is not None:
            self._probe.close()
        if self._recording:
            from lightning_memopt.utilities.memory import record_cuda_memory_history

            record_cuda_memory_history(False)
            self._recording = False
