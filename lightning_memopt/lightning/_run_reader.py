"""One reader of the run, shared by the callbacks and the strategy: what the predictor needs, read once per fit.

The glue between a live Lightning run and the pure predictor. :func:`read_run` returns the fit's
:class:`RunReader` (created at the first call, kept on the Trainer until the fit ends, see :func:`forget_run`). It
reads the first training batch from the loader Lightning trains with (built once, the batch handed back to the fit
loop) and the optimizer from one call of ``configure_optimizers`` whose result the Trainer receives when it asks;
the strategy settings (ZeRO stage, offload, the DeepSpeed config with MemOptStrategy's ``"auto"`` buckets resolved by
the strategy's own rule), world size, precision and accumulation are read when asked (they change during setup).
Private Lightning access is in :mod:`~lightning_memopt.lightning._compat`.
"""

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from lightning_memopt.lightning import _compat as compat
from lightning_memopt.predictor.trace.batch import batch_shape

__all__ = ["ReadsRun", "RunReader", "batch_shape", "forget_run", "lightning_step", "optimizer_name",
           "read_run", "strategy_settings"]  # fmt: skip

_KEY = "_lightning_memopt_run"
_UNREAD = object()


def read_run(trainer: "pl.Trainer") -> "RunReader":
    """The :class:`RunReader` of the Trainer's current run (the same object for every caller during a fit)."""
    reader = trainer.__dict__.get(_KEY)
    if reader is None or reader.pl_module is not trainer.lightning_module:
        forget_run(trainer)
        reader = trainer.__dict__[_KEY] = RunReader(trainer)
    return reader


def forget_run(trainer: "pl.Trainer | None") -> None:
    """Drop the reader of the run that ends (teardown, exception), with a ``configure_optimizers`` result the Trainer
    did not take; the next fit reads its own run."""
    reader = None if trainer is None else trainer.__dict__.pop(_KEY, None)
    if reader is not None:
        reader._release_optimizers()


class RunReader:
    """What the predictor needs from one fit, read once: the first training batch and the optimizer; the strategy
    settings, world size, precision and accumulation on request (:meth:`estimate_kwargs`).

    Args:
        trainer: the Trainer of the fit (its LightningModule is attached).
    """

    def __init__(self, trainer: "pl.Trainer") -> None:
        self.trainer = trainer
        self.pl_module = trainer.lightning_module
        self._batch: Any = _UNREAD
        self._optim_conf: Any = _UNREAD
        self._handover: Any = None

    # ------------------------------------------------------------------ the first batch
    def first_batch(self) -> Any:
        """The first training batch of the fit, on the CPU as the loader yields it (``None`` without training data).

        The loader is the one Lightning trains with: built once by the fit loop's own ``setup_data`` (earlier than
        the loop would), and the batch read here stays the first one the loop trains on (the loader's workers start
        once). A stateful loader (``state_dict``), which Lightning restores on resume after setup, is built again by
        the fit loop after this read.
        """
        if self._batch is _UNREAD:
            self._batch = self._read_first_batch()
        return self._batch

    def batch_shape(self) -> "tuple[int, int | None] | None":
        """``(micro-batch size, sequence length)`` of :meth:`first_batch` (``None`` without one)."""
        batch = self.first_batch()
        return None if batch is None else batch_shape(batch)

    def _read_first_batch(self) -> Any:
        trainer = self.trainer
        if not compat.train_source_defined(trainer):
            return None
        loader = compat.fit_train_loader(trainer)
        if loader is None:  # not fitting, or no training batches (limit_train_batches=0)
            return None
        kept, batch = compat.peek_first_batch(trainer)
        if not kept:  # another Lightning's fetcher: read a batch of our own and let the loop build its loader again
            batch = next(iter(loader), None)
        if not kept or compat.loader_is_stateful(trainer):
            compat.drop_train_loader(trainer)
        return batch

    def train_loader(self) -> Any:
        """The training loader: in ``fit`` the one Lightning trains with (built once); outside ``fit`` (or when the fit
        trains on no batch) the user's hook is asked for it, as Lightning's DeepSpeed strategy does. ``None`` without
        training data."""
        if not compat.train_source_defined(self.trainer):
            return None
        loader = compat.fit_train_loader(self.trainer)  # None outside fit or with limit_train_batches=0
        return compat.request_train_loader(self.trainer) if loader is None else loader

    def loader_batch_size(self) -> int | None:
        """The training loader's batch size (its batch sampler's); ``None`` when it has none."""
        size = getattr(getattr(self.train_loader(), "batch_sampler", None), "batch_size", None)
        return size if isinstance(size, int) and not isinstance(size, bool) else None

    # ------------------------------------------------------------------ the optimizer
    def optimizer(self) -> "torch.optim.Optimizer | None":
        """The run's (first) optimizer, before the strategy builds it: ``configure_optimizers`` is called once, as the
        Trainer calls it, and its result is handed to the Trainer when the strategy asks for it, unless the module's
        parameters changed in between (then the Trainer calls the hook again). ``None`` when the hook fails or is
        not overridden (the Trainer calls it later and reports the error)."""
        if self._optim_conf is _UNREAD:
            self._optim_conf = self._configure_optimizers()
        if self._optim_conf is None:
            return None
        try:
            optimizers = compat.parse_optimizers(self._optim_conf)
        except MisconfigurationException:  # Lightning raises it again, with its message, when it builds them
            return None
        return optimizers[0] if optimizers else None

    def optimizer_name(self) -> str | None:
        """The predictor's name of :meth:`optimizer` (``None`` when unknown).

        Raises:
            MisconfigurationException: an optimizer the predictor does not know, with the fix.
        """
        optimizer = self.optimizer()
        return None if optimizer is None else optimizer_name(optimizer)

    def _configure_optimizers(self) -> Any:
        module = self.pl_module
        if not is_overridden("configure_optimizers", module):
            return None
        try:
            optim_conf = compat.call_configure_optimizers(self.trainer, module)
        except Exception:  # e.g. it needs the strategy set up: the Trainer calls it later
            return None
        if optim_conf is None:
            return None
        params = [id(p) for p in module.parameters()]

        def configure_optimizers() -> Any:  # the Trainer's call: once, then the module's own method again
            module.__dict__.pop("configure_optimizers", None)
            if [id(p) for p in module.parameters()] != params:  # layers built or replaced since (configure_model)
                return module.configure_optimizers()
            return optim_conf

        module.__dict__["configure_optimizers"] = self._handover = configure_optimizers
        return optim_conf

    def _release_optimizers(self) -> None:
        if self._handover is not None and self.pl_module.__dict__.get("configure_optimizers") is self._handover:
            del self.pl_module.__dict__["configure_optimizers"]
        self._handover = None

    # ------------------------------------------------------------------ changes and settings
    def batch_changed(self) -> None:
        """The micro-batch or the accumulation changed (BatchPlanner): the loader is built again and
        ``configure_optimizers`` called again when next needed, so that both see the change (an LR schedule sized by
        ``trainer.estimated_stepping_batches`` included)."""
        if self.trainer.state.fn == TrainerFn.FITTING:
            compat.drop_train_loader(self.trainer)
        self._release_optimizers()
        self._batch = self._optim_conf = _UNREAD

    def estimate_kwargs(self, shape: "tuple[int, int | None]", optimizer: str) -> dict[str, Any]:
        """The ``estimate_memory`` keyword arguments of this run at a batch ``shape``: the strategy's settings, world
        size, precision, ``optimizer`` (a predictor name), micro-batch, sequence length and the Trainer's
        ``accumulate_grad_batches`` (gradient accumulation keeps gradients between micro-steps)."""
        trainer = self.trainer
        settings = strategy_settings(trainer.strategy, self.pl_module)
        settings.update(world_size=int(trainer.world_size), precision=str(trainer.precision), optimizer=optimizer,
                        micro_batch_size=int(shape[0]), accumulate_grad_batches=int(trainer.accumulate_grad_batches))
        if shape[1] is not None:
            settings["seq_len"] = int(shape[1])
        device = trainer.strategy.root_device
        if device.type == "cuda":  # this GPU's rules: its workspaces, context and the allocator's mode
            from lightning_memopt.predictor.device import KernelDevice, cuda_rules

            props = torch.cuda.get_device_properties(device)
            threads = getattr(props, "max_threads_per_multi_processor", KernelDevice.threads_per_multiprocessor)
            kernels = KernelDevice(props.multi_processor_count, threads)
            settings["device"] = cuda_rules(torch.cuda.get_device_name(device), capability=(props.major, props.minor),
                                            kernels=kernels)  # fmt: skip
        return settings


#: torch optimizer class name -> predictor optimizer name (``foreach``/``fused`` and momentum are read from defaults).
_OPTIMIZER_NAMES = {
    "adamw": "adamw",
    "adam": "adam",
    "sgd": "sgd",
    "fusedadam": "adamw",
    "deepspeedcpuadam": "adamw",
}


def optimizer_name(optimizer: Any, device: "str | None" = None) -> str:
    """The predictor's name for an optimizer instance (unwrapping Lightning's and DeepSpeed's wrappers).

    ``device``: the device type its parameters live on when its parameter groups are empty: DeepSpeed ZeRO-3 hands
    the torch optimizer its fp32 partitions only inside its own step (``stage3.py``,
    ``_set_fp32_optimizer_param_groups`` / ``_clear_fp32_optimizer_param_groups``), where torch picks its
    implementation from them; the strategy's root device (``None``: unknown, the single-tensor default).

    Raises:
        MisconfigurationException: for an optimizer the predictor does not know, with the fix.

    Example:
        >>> optimizer_name(torch.optim.AdamW([nn.Parameter(torch.zeros(1))], foreach=True))
        'adamw-foreach'
        >>> optimizer_name(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9))
        'sgd-momentum'
        >>> emptied = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
        >>> emptied.param_groups[0]["params"] = []  # as DeepSpeed ZeRO-3 leaves it between its steps
        >>> optimizer_name(emptied, "cuda"), optimizer_name(emptied, "cpu")
        ('adamw-foreach', 'adamw')
    """
    seen = 0
    while type(optimizer).__name__.lower() not in _OPTIMIZER_NAMES and seen < 4:
        inner = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer, seen = inner, seen + 1
    cls = type(optimizer).__name__
    base = _OPTIMIZER_NAMES.get(cls.lower())
    if base is None:
        raise MisconfigurationException(
            f"Expected an optimizer the memory predictor knows (Adam, AdamW, SGD), got {cls}."
            " Fix: pass the closest one explicitly, e.g. MemoryMonitor(optimizer='adamw')."
        )
    defaults = getattr(optimizer, "defaults", {}) or {}
    if base == "sgd":
        return "sgd-momentum" if defaults.get("momentum", 0) else "sgd"
    if cls.lower() in ("adam", "adamw"):
        if defaults.get("fused"):
            return f"{base}-fused"
        if defaults.get("foreach"):
            return f"{base}-foreach"
        # torch picks foreach by itself when every parameter is on CUDA
        # (torch/optim/optimizer.py, _default_to_fused_or_foreach)
        params = [p for group in getattr(optimizer, "param_groups", []) for p in group["params"]]
        on_cuda = all(p.device.type == "cuda" for p in params) if params else device == "cuda"
        if defaults.get("foreach") is None and on_cuda:
            return f"{base}-foreach"
    return base


def strategy_settings(strategy: Strategy, pl_module: nn.Module | None = None) -> dict[str, Any]:
    """``engine``, ``zero``, offload and ``deepspeed_config`` for ``estimate_memory`` from a strategy.

    ``MemOptStrategy`` resolves its ``"auto"`` bucket sizes during its setup; before that they are resolved here on a
    copy of its config (from ``pl_module``), with the strategy's own rule.

    Raises:
        MisconfigurationException: for a strategy other than single-device, DDP or DeepSpeed.

    Example:
        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> strategy_settings(SingleDeviceStrategy("cpu"))
        {'engine': 'torch', 'zero': 0}
    """
    if isinstance(strategy, DeepSpeedStrategy):
        config = copy.deepcopy(strategy.config or {})
        zero_config = config.get("zero_optimization") or {}
        arguments = getattr(strategy, "_bucket_arguments", None)  # MemOptStrategy before its setup resolved them
        if arguments and getattr(strategy, "_buckets_resolved", True) is False and pl_module is not None:
            from lightning_memopt.core.deepspeed_config import resolve_bucket_sizes

            resolve_bucket_sizes(config, pl_module, arguments)
        return {
            "engine": "deepspeed",
            "zero": int(zero_config.get("stage", 0)),
            "offload_optimizer": (zero_config.get("offload_optimizer") or {}).get("device") or False,
            "offload_parameters": (zero_config.get("offload_param") or {}).get("device") or False,
            "deepspeed_config": config,
        }
    if isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)):
        return {"engine": "torch", "zero": 0}
    raise MisconfigurationException(
        f"Expected a single-device, DDP or DeepSpeed strategy for the memory predictor, got {type(strategy).__name__}."
        " Fix: use `lightning_memopt.MemOptStrategy(zero=3)` (ZeRO-3 is what FSDP does) or strategy='ddp'."
    )


@contextlib.contextmanager
def lightning_step(pl_module: nn.Module) -> Iterator[None]:
    """Trace ``training_step`` as the fit runs it, with Lightning's calls that must not run on fake tensors
    stepped over (for the duration; restored after):

    - ``self.log`` / ``self.log_dict`` do nothing (the predictor runs the step outside any hook Lightning allows
      logging in);
    - the strategy's collectives (``reduce``, ``all_gather``, ``broadcast``, ``barrier``,
      ``reduce_boolean_decision``; ``self.all_gather`` goes through them) answer as they would without
      communicating: ``reduce`` hands back its tensor (the in-place all-reduce of DDP and DeepSpeed), ``all_gather``
      a stack of ``world_size`` copies (the gathered shape);
    - manual optimization: ``self.manual_backward(loss)`` is ``loss.backward()``, ``self.optimizers()`` and
      ``self.lr_schedulers()`` return stand-ins whose ``step`` runs only a closure (the optimizer step is the
      predictor's model states), ``zero_grad`` does nothing (the trace hands every gradient to the engine at once),
      ``self.clip_gradients`` and ``toggle_optimizer`` / ``untoggle_optimizer`` do nothing.

    The step is called as Lightning calls it, ``training_step(batch, 0)``; what-if models built from the config are
    stepped by the predictor's default.
    """
    from lightning_memopt.predictor.trace.step_context import stepping

    if not isinstance(pl_module, pl.LightningModule):
        yield
        return
    trainer = pl_module._trainer
    optimizers = _stepped_optimizers(trainer)
    module_patches = {
        "log": _nothing,
        "log_dict": _nothing,
        "manual_backward": lambda loss, *args, **kwargs: loss.backward(*args, **kwargs),
        "clip_gradients": _nothing,
        "toggle_optimizer": _nothing,
        "untoggle_optimizer": _nothing,
        "lr_schedulers": lambda: _lr_schedulers(trainer),
    }
    if optimizers is not None:
        module_patches["optimizers"] = lambda use_pl_optimizer=True: (
            optimizers[0] if len(optimizers) == 1 else list(optimizers)
        )
    strategy = None if trainer is None else trainer.strategy
    world = 1 if trainer is None else int(trainer.world_size)
    strategy_patches = {
        "reduce": lambda tensor, *args, **kwargs: tensor,
        "all_gather": lambda tensor, *args, **kwargs: _gathered(tensor, world),
        "broadcast": lambda obj, *args, **kwargs: obj,
        "barrier": _nothing,
        "reduce_boolean_decision": lambda decision, *args, **kwargs: decision,
    }

    def step(module: nn.Module, batch: Any) -> Any:
        if module is not pl_module:
            return NotImplemented
        return pl_module.training_step(batch, 0)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_instance_patches(pl_module, module_patches))
        if strategy is not None:
            stack.enter_context(_instance_patches(strategy, strategy_patches))
        stack.enter_context(stepping(step))
        yield


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def _instance_patches(obj: Any, patches: "dict[str, Any]") -> Iterator[None]:
    """Set ``patches`` as instance attributes of ``obj`` for the duration, putting back what was there."""
    had = {name: obj.__dict__[name] for name in patches if name in obj.__dict__}
    obj.__dict__.update(patches)
    try:
        yield
    finally:
        for name in patches:
            if name in had:
                obj.__dict__[name] = had[name]
            else:
                obj.__dict__.pop(name, None)


def _gathered(data: Any, world: int) -> Any:
    """What ``all_gather`` returns on ``world`` ranks, computed locally: every tensor stacked ``world`` times."""
    from torch.utils._pytree import tree_map

    if world <= 1:
        return data
    return tree_map(lambda t: torch.stack([t] * world) if isinstance(t, torch.Tensor) else t, data)


class _SteppedOver:
    """An optimizer or LR scheduler in a traced step: ``step`` runs only the closure it is given, ``zero_grad``
    tells the trace the previous gradients are freed; anything else (``param_groups``, ``defaults``) is the real
    one's, when there is one."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def step(self, closure: Any = None, *args: Any, **kwargs: Any) -> Any:
        return closure() if callable(closure) else None

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        from lightning_memopt.predictor.trace.step_context import gradients_released

        # the trace hands every gradient to the engine at once; it notes which ones the step frees, and when
        gradients_released(None if self._inner is None else [p for g in self._inner.param_groups for p in g["params"]])

    @contextlib.contextmanager
    def toggle_model(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        yield

    def __getattr__(self, name: str) -> Any:
        if name == "_inner" or self._inner is None:
            raise AttributeError(name)
        return getattr(self._inner, name)


def _stepped_optimizers(trainer: "pl.Trainer | None") -> "list[_SteppedOver] | None":
    """Stand-ins for the run's optimizers: the Trainer's once built, else those of the run reader's one
    ``configure_optimizers`` call (``None`` without a Trainer or an optimizer)."""
    if trainer is None:
        return None
    optimizers = list(trainer.optimizers)
    reader = trainer.__dict__.get(_KEY)
    if not optimizers and reader is not None:
        reader.optimizer()  # the hook's result, read once per fit
        conf = reader._optim_conf
        try:
            optimizers = compat.parse_optimizers(conf) if conf not in (None, _UNREAD) else []
        except MisconfigurationException:
            optimizers = []
    return [_SteppedOver(o) for o in optimizers] or None


def _lr_schedulers(trainer: "pl.Trainer | None") -> Any:
    """Stand-ins for the Trainer's LR schedulers; before the strategy built them (the prediction in ``setup``), one
    stand-in (its ``step`` does nothing either way)."""
    configs = [] if trainer is None else list(trainer.lr_scheduler_configs)
    if not configs:
        return _SteppedOver(None)
    stand_ins = [_SteppedOver(config.scheduler) for config in configs]
    return stand_ins[0] if len(stand_ins) == 1 else stand_ins


class ReadsRun(Callback):
    """A callback that uses the fit's :class:`RunReader`: it drops the reader when the fit ends or fails."""

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        forget_run(trainer)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        forget_run(trainer)
