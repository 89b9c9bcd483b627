"""MemoryMonitor's prediction of a fit: one estimate per batch shape and optimizer, the fit check, the suggestions."""

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_memopt.core.units import format_bytes
from lightning_memopt.lightning._run_reader import lightning_step, read_run
from lightning_memopt.lightning.callbacks._memory_report import fit_check_message, unit_for
from lightning_memopt.predictor.report.estimate import MemoryEstimate


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


def default_device_memory(trainer: "pl.Trainer", device: torch.device) -> int:
    """One device's memory: the CUDA device's total, or on CPU the system memory over the processes of the machine."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total // max(1, trainer.num_devices))


def transforms_pending(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> bool:
    """Whether a transform callback of the Trainer has yet to apply its transform (after ``configure_model``)."""
    from lightning_memopt.lightning.callbacks import transforms as transform_callbacks
    from lightning_memopt.transforms import applied_transforms

    applied = applied_transforms(pl_module)
    return any(isinstance(cb, transform_callbacks._TransformCallback) and cb._key not in applied
               for cb in trainer.callbacks)  # fmt: skip


class FitPrediction:
    """The predictions of one fit, with the run's settings from the shared run reader.

    Args:
        device_memory: one device's memory in bytes (the fit check's device).
        margin: fraction of the device kept free.
        fail_if_not_fits: raise :class:`MemoryDoesNotFitError` (else warn) when the estimate does not fit.
        max_suggestions: at most this many suggestions.
    """

    def __init__(self, device_memory: int, margin: float, fail_if_not_fits: bool, max_suggestions: int) -> None:
        self.device_memory, self.margin = device_memory, margin
        self.fail_if_not_fits, self.max_suggestions = fail_if_not_fits, max_suggestions
        #: the current estimate (``None``: none yet, or the model cannot be predicted).
        self.estimate: MemoryEstimate | None = None
        #: the predictor's optimizer name (``None``: not known yet).
        self.optimizer_name: str | None = None
        self.shape: Any = None
        self.checked = False
        self._kwargs: dict[str, Any] = {}
        self._estimates: dict[Any, tuple[MemoryEstimate, dict[str, Any]]] = {}
        self._warned = False

    def refresh(self) -> None:
        """Forget the estimates (the strategy's config or the optimizer changed).

        The next :meth:`predict` redoes them.
        """
        self._estimates.clear()

    def predict(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", shape: Any, batch: Any = None) -> bool:
        """Predict for this batch shape (once per shape and optimizer); ``False`` when the model cannot be predicted,
        after one warning: the monitor then logs the actual memory only."""
        from lightning_memopt.planning.estimate import estimate_memory

        key = (shape, self.optimizer_name)
        if key not in self._estimates:
            run = read_run(trainer)
            kwargs = run.estimate_kwargs(shape, self.optimizer_name or "adamw")
            kwargs.update(model=pl_module, example_batch=run.first_batch() if batch is None else batch)
            try:
                with lightning_step(pl_module):
                    self._estimates[key] = (estimate_memory(**kwargs), kwargs)
            except Exception as err:  # a callback never ends the run it observes
                self.unpredictable(pl_module, err)
                return False
        self.estimate, self._kwargs = self._estimates[key]
        self.shape = shape
        return True

    def unpredictable(self, pl_module: "pl.LightningModule", err: BaseException) -> None:
        """No prediction for this model: warn once; the actual memory is logged alone and the fit check skipped."""
        self.estimate = None
        if not self._warned:
            self._warned = True
            notes = " ".join(getattr(err, "__notes__", ()))  # where in the user's step the trace stopped
            rank_zero_warn(
                f"MemoryMonitor cannot predict the memory of {type(pl_module).__name__}: {type(err).__name__}: {err}"
                f"{' ' + notes if notes else ''} It logs the actual memory only, and the fit check is skipped. Fix:"
                " what the error says, or report the model at the project's issue tracker."
            )

    def peak(self, first_micro_step: bool, on_cpu: bool) -> int:
        """The predicted peak a step is compared with (-1: none). The first micro-batch of an accumulation window
        (or a lone one) holds no earlier micro-step's gradients; on a CPU device offloaded states count too."""
        est = self.estimate
        if est is None:
            return -1
        if first_micro_step and self._kwargs.get("accumulate_grad_batches", 1) > 1:
            est = self._first_micro_step_estimate()
        return est.total + (est.cpu_offloaded if on_cpu else 0)

    def _first_micro_step_estimate(self) -> MemoryEstimate:
        from lightning_memopt.planning.estimate import estimate_memory

        key = (self.shape, self.optimizer_name, "first micro-step")
        if key not in self._estimates:
            kwargs = dict(self._kwargs, accumulate_grad_batches=1)
            with lightning_step(kwargs["model"]):
                self._estimates[key] = (estimate_memory(**kwargs), kwargs)
        return self._estimates[key][0]

    def table(self) -> str:
        """The current estimate's breakdown, and the data-dependent ops of the step it depends on (the first batch's
        values, or the assumptions made where a value comes from the weights) with the user's lines."""
        if self.estimate is None:
            return ""
        text = self.estimate.table(unit_for(self.estimate.total))
        depends = (self.estimate.details or {}).get("depends_on_batch")
        if depends:
            text += (
                "\nThe prediction depends on values of the first training batch (or, where a value comes from the"
                " weights, on the assumption stated) read by the step at:\n" + "\n".join(f"  {d}" for d in depends)
            )
        return text

    def suggestions(self, trainer: "pl.Trainer") -> list:
        """Ranked changes that make the run fit, each with its predicted peak."""
        from lightning_memopt.planning.suggest import suggest_fixes

        kwargs = dict(self._kwargs)
        zero_config = None
        if kwargs.get("engine") == "torch":  # a ZeRO suggestion means MemOptStrategy, with its "auto" bucket sizes
            from lightning_memopt.core.deepspeed_config import BUCKET_KNOBS, resolve_bucket_sizes

            zero_config = {}
            resolve_bucket_sizes(zero_config, trainer.lightning_module, dict.fromkeys(BUCKET_KNOBS, "auto"))
        with lightning_step(trainer.lightning_module):
            return suggest_fixes(
                kwargs,
                self.device_memory,
                self.margin,
                max_suggestions=self.max_suggestions,
                cuda=trainer.strategy.root_device.type == "cuda",  # Liger's Triton kernels need a CUDA GPU
                zero_config=zero_config,
            )

    def check_fit(self, trainer: "pl.Trainer") -> None:
        """Compare the estimate with ``device_memory * (1 - margin)``: print that it fits, or raise (warn) with the
        breakdown and the suggestions."""
        self.checked = True
        est = self.estimate
        budget = int(self.device_memory * (1.0 - self.margin))
        if est is None or est.total <= budget:
            if est is not None:
                unit = unit_for(self.device_memory)
                rank_zero_info(f"MemoryMonitor: fits: predicted peak {format_bytes(est.total, unit)} <= budget"
                               f" {format_bytes(budget, unit)} ({format_bytes(self.device_memory, unit)} with"
                               f" {self.margin:.0%} kept free)")  # fmt: skip
            return
        fixes = self.suggestions(trainer)
        message = fit_check_message(est, self.device_memory, self.margin, fixes)
        if self.fail_if_not_fits:
            raise MemoryDoesNotFitError(message, est, fixes)
        rank_zero_warn(message)
