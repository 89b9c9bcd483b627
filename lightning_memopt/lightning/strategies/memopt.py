"""MemOptStrategy: DeepSpeed ZeRO 0-3 for any LightningModule, on CUDA (nccl) and on CPU (gloo)."""

import copy
import logging
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_memopt.core.deepspeed_config import (
    BUCKET_KNOBS,
    check_with_deepspeed,
    resolve_bucket_sizes,
    validate_bucket,
    without_disabled_offload,
)
from lightning_memopt.lightning.strategies import _deepspeed_compat as compat
from lightning_memopt.lightning.strategies.allocator import (
    expandable_segments_for_fit,
    restore_allocator,
    validate_expandable_segments,
)
from lightning_memopt.lightning.strategies.arguments import (
    LOSS_SCALING,
    given_arguments,
    resolve_arguments,
    signature_defaults,
)
from lightning_memopt.lightning.strategies.setup_config import (
    check_checkpointing_conflict,
    check_checkpointing_section,
    check_cpu_precision,
    check_deepspeed_cpu_accelerator,
    format_batch_sizes,
    micro_batch_size,
    warn_unused_loss_scaling,
)
from lightning_memopt.lightning.strategies.transforms import apply_transforms, validate_transforms

if TYPE_CHECKING:
    import deepspeed


class MemOptStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO for any LightningModule, on GPUs and on CPU.

    ``Trainer(strategy=MemOptStrategy(zero=3))`` shards optimizer states (ZeRO-1), gradients (ZeRO-2) and
    parameters (ZeRO-3) across the data-parallel ranks (Rajbhandari et al., 2020, "ZeRO: Memory Optimizations
    Toward Training Trillion Parameter Models"). It subclasses Lightning's
    :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`, accepts every argument of it with the same meaning
    (a drop-in: swap the class in a script or a LightningCLI YAML) and adds what it lacks:

    * CPU training with the gloo backend (any number of processes), for development and CI;
    * flat, documented arguments with bucket sizes scaled to the model (``"auto"``), instead of 200M-element
      buckets that cost 400 MB up front on a 3M-parameter model;
    * validation at construction and setup time, with the fix in every message;
    * validate/test/predict from a ZeRO-3 checkpoint (DeepSpeed #7272 worked around).

    The differences from Lightning's strategy are listed in ``docs/strategy.md``. Registered names:
    ``"memopt_zero1"``, ``"memopt_zero2"``, ``"memopt_zero3"``, ``"memopt_zero3_offload"``.

    Args:
        zero: ZeRO stage 0 (plain data parallel), 1 (optimizer states sharded), 2 (+ gradients) or 3
            (+ parameters). ``None`` means 2, or the stage of ``config`` when one is given.
        offload_optimizer: ``False``, ``"cpu"`` (or ``True``) or ``"nvme"``: keep optimizer states (and the
            step) in host memory or on NVMe (ZeRO-Offload). Needs ``zero >= 1``.
        offload_parameters: ``False``, ``"cpu"`` (or ``True``) or ``"nvme"``: keep parameters off the device
            (ZeRO-Infinity). Needs ``zero=3``.
        nvme_path: directory on a local NVMe drive for NVMe offload; ``None``: Lightning's ``"/local_nvme"`` if
            that directory exists, else an error.
        pin_memory: pin the host buffers of offloaded states (faster transfers, more page-locked memory).
        reduce_bucket_size: elements per gradient reduce bucket, or ``"auto"``: hidden² of the model (the
            Hugging Face integration's rule), at least its largest parameter, at most DeepSpeed's 5e8.
        allgather_bucket_size: elements per all-gather bucket (ZeRO 1-2), or ``"auto"`` (as above).
        prefetch_bucket_size: ZeRO-3 parameters prefetched ahead of use, in elements, or ``"auto"`` (0.9 x bucket).
        param_persistence_threshold: ZeRO-3 keeps parameters with at most this many elements whole on every
            rank; ``"auto"`` = 10 x hidden size (DeepSpeed's default 1e5 keeps most of a small model whole).
        max_live_parameters: ZeRO-3 upper bound of gathered parameters alive at once, in elements.
        contiguous_gradients: copy gradients into one contiguous buffer as they are produced.
        overlap_comm: overlap gradient reduction with backward (``None``: DeepSpeed's default for the stage).
        activation_checkpointing: ``True`` checkpoints every transformer block, a float in (0, 1] the first
            fraction of them (see :func:`~lightning_memopt.transforms.apply_activation_checkpointing`); applied
            before DeepSpeed wraps the model, non-reentrant, and working under ZeRO-3. ``"budget"`` checkpoints
            the fewest leading blocks whose predicted peak fits ``memory_budget``
            (see :func:`~lightning_memopt.planning.budget.checkpoint_to_fit`), planned at ``fit`` setup for the
            micro-batch size and sequence length of the first batch of the training dataloader.
        checkpointing_policy: which blocks: ``"auto"`` (Hugging Face ``_no_split_modules``, else the largest
            ``ModuleList`` of same-class blocks) or class names.
        attention: ``None`` (keep the model's), ``"auto"``, ``"flash_attention_2"``, ``"sdpa"`` or ``"eager"``
            (see :func:`~lightning_memopt.transforms.apply_attention`).
        liger: ``True`` for Liger-Kernel's default kernels, or a dict of switches (``rms_norm``, ``rope``,
            ``swiglu``, ``cross_entropy``, ``fused_linear_cross_entropy``, ``strict``); needs CUDA
            (see :func:`~lightning_memopt.transforms.apply_liger`).
        memory_budget: bytes per rank or a size such as ``"24GiB"`` for ``activation_checkpointing="budget"``;
            ``None`` = the CUDA device's total memory less 10 % (on CPU a budget is required).
        expandable_segments: the CUDA caching allocator's ``expandable_segments`` for the fit (it reserves less
            beyond what it allocates; see :mod:`~lightning_memopt.lightning.strategies.allocator`). ``None``: on when
            neither ``PYTORCH_CUDA_ALLOC_CONF`` nor ``PYTORCH_ALLOC_CONF`` is set, else your setting is kept;
            ``True``: on; ``False``: the allocator is left alone. Turned off again at teardown; no effect on CPU.
        config: a DeepSpeed config dict or JSON path used instead of the arguments that build one (which must then
            be left at their defaults); ``None`` reads the path in ``PL_DEEPSPEED_CONFIG_PATH`` when it is set, as
            Lightning does. ``gradient_accumulation_steps`` and ``train_batch_size`` in it must agree with the
            Trainer; a ``train_micro_batch_size_per_gpu`` is kept (with a warning if the DataLoader differs).
        accelerator: see :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`.
        parallel_devices: see :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`.
        cluster_environment: see :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`.
        precision_plugin: see :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`.
        process_group_backend: ``"nccl"`` on CUDA and ``"gloo"`` on CPU when ``None``.
        timeout: collective timeout; a rank that dies makes the others fail after at most this long.
        logging_level: DeepSpeed's log level.
        load_full_weights: load a single consolidated checkpoint file instead of a sharded directory.
        exclude_frozen_parameters: leave frozen parameters out of saved checkpoints.
        stage: Lightning's name of ``zero`` (give one of them).
        zero_optimization: ``False`` is ``zero=0``.
        remote_device: where ZeRO-3's ``deepspeed.zero.Init`` keeps new partitions (``"cpu"``, ``"nvme"``).
        offload_optimizer_device: the device of ``offload_optimizer=True``: ``"cpu"`` (default) or ``"nvme"``.
        offload_params_device: the device of ``offload_parameters=True``: ``"cpu"`` (default) or ``"nvme"``.
        params_buffer_count: see :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` (NVMe offload only,
            like ``params_buffer_size``, ``max_in_cpu``, ``optimizer_buffer_count``, ``block_size``,
            ``queue_depth``, ``single_submit``, ``overlap_events`` and ``thread_count``).
        params_buffer_size: as above.
        max_in_cpu: as above.
        optimizer_buffer_count: as above.
        block_size: as above.
        queue_depth: as above.
        single_submit: as above.
        overlap_events: as above.
        thread_count: as above; written as DeepSpeed's ``aio.intra_op_parallelism``.
        sub_group_size: ZeRO-3 optimizer-step tile, in elements; ``None``: DeepSpeed's default (1e9).
        allgather_partitions: see :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`.
        reduce_scatter: see :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`.
        zero_allow_untested_optimizer: see :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`.
        logging_batch_size_per_gpu: DeepSpeed's ``train_micro_batch_size_per_gpu``; ``"auto"`` reads the training
            DataLoader's batch size.
        loss_scale: fp16 loss scaling (``precision="16-mixed"``, GPUs), as in Lightning; 0 is dynamic. Like
            ``initial_scale_power``, ``loss_scale_window``, ``hysteresis`` and ``min_loss_scale``, checked by
            DeepSpeed's config model at construction; with another precision they warn that they do nothing.
        initial_scale_power: as above.
        loss_scale_window: as above.
        hysteresis: as above.
        min_loss_scale: as above.
        partition_activations: ``deepspeed.checkpointing`` setting (with ``cpu_checkpointing``,
            ``contiguous_memory_optimization``, ``synchronize_checkpoint_boundary``): written to the config's
            ``activation_checkpointing`` section and configured at fit. They act where the model calls
            ``deepspeed.checkpointing.checkpoint``, so they are refused together with ``activation_checkpointing``.
        cpu_checkpointing: as above.
        contiguous_memory_optimization: as above; needs ``partition_activations`` and ``number_checkpoints`` in the
            config's section.
        synchronize_checkpoint_boundary: as above.

    Raises:
        ValueError: a ZeRO stage outside 0..3, ``zero`` and ``stage`` that differ, parameter offload without
            ZeRO-3, optimizer offload with ZeRO-0, NVMe offload without a directory, NVMe settings without NVMe
            offload, a bad bucket size, a value DeepSpeed's config model rejects, arguments given together with
            ``config`` that Lightning would ignore, or DeepSpeed's checkpointing settings with
            ``activation_checkpointing``.
        ModuleNotFoundError: when deepspeed is not installed.
        MisconfigurationException: at setup, for a precision the accelerator cannot run, several optimizers,
            a training DataLoader without a batch size, or a ``config`` that contradicts the Trainer.

    Example:
        >>> strategy = MemOptStrategy(stage=3, offload_optimizer=True)
        >>> strategy.zero_stage, strategy.config["zero_optimization"]["offload_optimizer"]["device"]
        (3, 'cpu')
    """

    strategy_name = "memopt"

    def __init__(
        self,
        zero: int | None = None,
        offload_optimizer: bool | str = False,
        offload_parameters: bool | str = False,
        nvme_path: str | None = None,
        pin_memory: bool = False,
        reduce_bucket_size: int | str = "auto",
        allgather_bucket_size: int | str = "auto",
        prefetch_bucket_size: int | str = "auto",
        param_persistence_threshold: int | str = "auto",
        max_live_parameters: int = 1_000_000_000,
        contiguous_gradients: bool = True,
        overlap_comm: bool | None = None,
        activation_checkpointing: bool | float | str = False,
        checkpointing_policy: str | list[str] = "auto",
        attention: str | None = None,
        liger: bool | dict[str, bool] = False,
        memory_budget: int | str | None = None,
        expandable_segments: bool | None = None,
        config: str | Path | dict[str, Any] | None = None,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        logging_level: int = logging.WARNING,
        load_full_weights: bool = False,
        exclude_frozen_parameters: bool = False,
        stage: int | None = None,
        zero_optimization: bool = True,
        remote_device: str | None = None,
        offload_optimizer_device: str | None = None,
        offload_params_device: str | None = None,
        params_buffer_count: int = 5,
        params_buffer_size: int = 100_000_000,
        max_in_cpu: int = 1_000_000_000,
        optimizer_buffer_count: int = 4,
        block_size: int = 1048576,
        queue_depth: int = 8,
        single_submit: bool = False,
        overlap_events: bool = True,
        thread_count: int = 1,
        sub_group_size: int | None = None,
        allgather_partitions: bool = True,
        reduce_scatter: bool = True,
        zero_allow_untested_optimizer: bool = True,
        logging_batch_size_per_gpu: str | int = "auto",
        loss_scale: float = 0,
        initial_scale_power: int = 16,
        loss_scale_window: int = 1000,
        hysteresis: int = 2,
        min_loss_scale: int = 1,
        partition_activations: bool = False,
        cpu_checkpointing: bool = False,
        contiguous_memory_optimization: bool = False,
        synchronize_checkpoint_boundary: bool = False,
    ) -> None:
        values = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        self._transforms = validate_transforms(
            activation_checkpointing, checkpointing_policy, attention, liger, memory_budget
        )
        for name in BUCKET_KNOBS:
            validate_bucket(name, values[name])
        validate_expandable_segments(expandable_segments)
        given = given_arguments(values, signature_defaults(MemOptStrategy), signature_defaults(DeepSpeedStrategy))
        scaling = {name: values[name] for name in LOSS_SCALING}
        if given & set(LOSS_SCALING):
            check_with_deepspeed("fp16", {"enabled": True, **scaling}, "the strategy's arguments")
        if config is not None and not isinstance(config, (str, Path, dict)):
            raise TypeError(f"Expected `config` to be a dict or a path to a JSON file, got {type(config).__name__}.")
        from_env = config is None and self.DEEPSPEED_ENV_VAR in os.environ
        loaded = self._load_config(config)  # Lightning's: reads PL_DEEPSPEED_CONFIG_PATH when `config` is None
        source = f"the config in ${self.DEEPSPEED_ENV_VAR}" if from_env else "`config`"
        settings = resolve_arguments(values, given, None if loaded is None else copy.deepcopy(loaded), source)
        check_checkpointing_conflict(settings.config, self._transforms)
        super().__init__(
            accelerator=accelerator,
            config=settings.config,
            logging_level=logging_level,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            load_full_weights=load_full_weights,
            exclude_frozen_parameters=exclude_frozen_parameters,
            remote_device=settings.remote_device,
            **scaling,
        )
        self.zero_stage = settings.zero
        self.offload_optimizer = settings.offload_optimizer
        self.offload_parameters = settings.offload_parameters
        self.nvme_path = settings.nvme_path
        self._bucket_arguments = {name: values[name] for name in BUCKET_KNOBS}
        self._buckets_resolved = False
        self._loss_scaling_given = [name for name in LOSS_SCALING if name in given]
        self._restore_checkpointing: Callable[[], None] | None = None
        self.expandable_segments = expandable_segments
        self._restore_allocator: str | None = None

    # ------------------------------------------------------------------ environment and process group
    @override
    def setup_environment(self) -> None:
        if self.root_device.type == "cuda":
            if self._restore_allocator is None:  # before the model moves to the device
                self._restore_allocator = expandable_segments_for_fit(self.expandable_segments)
            super().setup_environment()
            return
        check_cpu_precision(self.precision_plugin.precision)
        # Lightning's DeepSpeedStrategy refuses non-CUDA accelerators; DDP's setup is all CPU needs.
        DDPStrategy.setup_environment(self)

    @override
    def setup_distributed(self) -> None:
        from lightning_memopt.lightning._compat import destroy_process_group_at_exit

        created = not torch.distributed.is_initialized()  # a group the user made is theirs to destroy
        try:
            if self.root_device.type == "cuda":
                super().setup_distributed()
            else:  # Lightning validates CUDA device indices here, which CPU devices do not have
                reset_seed()
                self.set_world_ranks()
                self._init_deepspeed_distributed()
                check_deepspeed_cpu_accelerator()
        finally:
            if created and torch.distributed.is_initialized():
                destroy_process_group_at_exit()

    # ------------------------------------------------------------------ transforms
    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        # After `configure_model` (and ZeRO-3's `zero.Init`), before DeepSpeed wraps the model.
        apply_transforms(self.lightning_module, self._transforms, self.root_device, trainer.precision, trainer)
        super().setup(trainer)

    # ------------------------------------------------------------------ config
    @override
    def _format_config(self) -> None:
        check_checkpointing_section(self.config)
        if self.config.get("zero_optimization"):
            self.config["zero_optimization"] = without_disabled_offload(self.config["zero_optimization"])
        super()._format_config()
        self._resolve_bucket_sizes()
        warn_unused_loss_scaling(self._loss_scaling_given, self.precision_plugin.precision)

    def _resolve_bucket_sizes(self) -> None:
        if not self._buckets_resolved and self.lightning_module is not None:
            resolve_bucket_sizes(self.config, self.lightning_module, self._bucket_arguments)
            self._buckets_resolved = True

    @override
    def _format_batch_size_and_grad_accum_config(self) -> None:
        if self.lightning_module is None:
            return
        format_batch_sizes(self.config, self.lightning_module.trainer, self.world_size)
        super()._format_batch_size_and_grad_accum_config()

    @override
    def _auto_select_batch_size(self) -> int:
        return micro_batch_size(self.lightning_module.trainer)

    @override
    def _init_optimizers(self) -> tuple[Optimizer, Any]:
        from lightning_memopt.lightning._compat import init_optimizers_and_lr_schedulers

        optimizers, schedulers = init_optimizers_and_lr_schedulers(self.lightning_module)
        if len(optimizers) != 1 or len(schedulers) > 1:
            raise MisconfigurationException(
                f"Expected one optimizer and at most one LR scheduler from `configure_optimizers` with DeepSpeed,"
                f" got {len(optimizers)} optimizers and {len(schedulers)} schedulers."
                " Fix: return a single optimizer (use parameter groups for different settings)."
            )
        return optimizers[0], schedulers[0] if schedulers else None

    # ------------------------------------------------------------------ engine
    @override
    def _setup_model_and_optimizer(self, model: Module, optimizer: Optimizer | None, lr_scheduler: Any = None):
        if self.root_device.index is not None:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        with compat.device_rank_for_deepspeed(self.local_rank):
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    @override
    def _initialize_deepspeed_inference(self, model: Module) -> None:
        from deepspeed.runtime import constants

        # Lightning reads this key unconditionally at ZeRO-3 (KeyError for a user config without it):
        # DeepSpeed's default
        self.config.setdefault(constants.ZERO_ALLOW_UNTESTED_OPTIMIZER, constants.ZERO_ALLOW_UNTESTED_OPTIMIZER_DEFAULT)
        if self.root_device.index is not None:
            super()._initialize_deepspeed_inference(model)
            return
        with compat.device_rank_for_deepspeed(self.local_rank):
            super()._initialize_deepspeed_inference(model)

    @override
    def _set_deepspeed_activation_checkpointing(self) -> None:
        section = self.config.get("activation_checkpointing")
        if section and self._restore_checkpointing is None:
            self._restore_checkpointing = compat.configure_deepspeed_checkpointing(section)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        with compat.zero3_load_without_optimizer(self.model):
            return super().load_checkpoint(checkpoint_path, weights_only)

    @override
    def teardown(self) -> None:
        from lightning_memopt.lightning._run_reader import forget_run

        trainer = getattr(self.lightning_module, "_trainer", None)
        engine = self.model
        super().teardown()
        compat.release_engine(engine)  # DeepSpeed's hooks and globals would keep the model alive after the fit
        forget_run(trainer)  # this fit's run reader, and a configure_optimizers result the fit did not take
        compat.restore_torch_linear()
        if self._restore_checkpointing is not None:
            self._restore_checkpointing()
            self._restore_checkpointing = None
        restore_allocator(self._restore_allocator)
        self._restore_allocator = None

    @property
    def deepspeed_engine(self) -> "deepspeed.DeepSpeedEngine":
        """The :class:`deepspeed.DeepSpeedEngine` that wraps the LightningModule after setup."""
        return self.model

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for zero in (1, 2, 3):
            description = f"MemOptStrategy, ZeRO stage {zero}"
            strategy_registry.register(f"memopt_zero{zero}", cls, override=True, description=description, zero=zero)
        description = "MemOptStrategy, ZeRO stage 3 with optimizer and parameters offloaded to CPU"
        strategy_registry.register("memopt_zero3_offload", cls, override=True, description=description, zero=3,
                                   offload_optimizer="cpu", offload_parameters="cpu")

