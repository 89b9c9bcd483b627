"""MemOptStrategy: DeepSpeed ZeRO 0-3 for any LightningModule, on CUDA (nccl) and on CPU (gloo)."""

import argparse
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_memopt._imports import _DEEPSPEED_AVAILABLE, requires
from lightning_memopt.strategies.transforms import apply_transforms, validate_transforms
from lightning_memopt.strategies.deepspeed_config import (
    BUCKET_KNOBS,
    apply_bucket_sizes,
    auto_bucket_sizes,
    build_deepspeed_config,
    infer_hidden_size,
    normalize_offload,
    validate_bucket,
    validate_zero_settings,
    zero_stage_of,
)

if TYPE_CHECKING:
    import deepspeed

_CPU_PRECISIONS = ("bf16-mixed", "bf16-true", "32-true")
_DEFAULT_ZERO = 2


class MemOptStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO for any LightningModule, on GPUs and on CPU.

    ``Trainer(strategy=MemOptStrategy(zero=3))`` shards optimizer states (ZeRO-1), gradients (ZeRO-2) and
    parameters (ZeRO-3) across the data-parallel ranks (Rajbhandari et al., 2020, "ZeRO: Memory Optimizations
    Toward Training Trillion Parameter Models"). It subclasses Lightning's
    :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` and adds what that one lacks:

    * CPU training with the gloo backend (any number of processes), for development and CI;
    * flat, documented arguments with bucket sizes scaled to the model (``"auto"``), instead of 200M-element
      buckets that cost 400 MB up front on a 3M-parameter model;
    * validation at construction and setup time, with the fix in every message.

    Registered names: ``"memopt_zero1"``, ``"memopt_zero2"``, ``"memopt_zero3"``, ``"memopt_zero3_offload"``.

    Args:
        zero: ZeRO stage 0 (plain data parallel), 1 (optimizer states sharded), 2 (+ gradients) or 3
            (+ parameters). ``None`` means 2, or the stage of ``config`` when one is given.
        offload_optimizer: ``False``, ``"cpu"`` (or ``True``) or ``"nvme"``: keep optimizer states (and the
            step) in host memory or on NVMe (ZeRO-Offload). Needs ``zero >= 1``.
        offload_parameters: ``False``, ``"cpu"`` (or ``True``) or ``"nvme"``: keep parameters off the device
            (ZeRO-Infinity). Needs ``zero=3``.
        nvme_path: directory on a local NVMe drive, required for NVMe offload.
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
            (see :func:`~lightning_memopt.transforms.checkpoint_to_fit`), planned at ``fit`` setup for the
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
        config: a DeepSpeed config dict or JSON path used instead of the arguments above (which must then be
            left at their defaults). ``gradient_accumulation_steps`` and ``train_micro_batch_size_per_gpu`` in it
            must agree with the Trainer.
        accelerator: see :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`.
        parallel_devices: see :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`.
        cluster_environment: see :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`.
        precision_plugin: see :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`.
        process_group_backend: ``"nccl"`` on CUDA and ``"gloo"`` on CPU when ``None``.
        timeout: collective timeout; a rank that dies makes the others fail after at most this long.
        logging_level: DeepSpeed's log level.
        load_full_weights: load a single consolidated checkpoint file instead of a sharded directory.
        exclude_frozen_parameters: leave frozen parameters out of saved checkpoints.

    Raises:
        ValueError: a ZeRO stage outside 0..3, parameter offload without ZeRO-3, optimizer offload with ZeRO-0,
            NVMe offload without ``nvme_path``, a bad bucket size, or arguments given together with ``config``.
        ModuleNotFoundError: when deepspeed is not installed.
        MisconfigurationException: at setup, for a precision the accelerator cannot run, several optimizers,
            or a ``config`` that contradicts the Trainer.

    Example:
        >>> strategy = MemOptStrategy(zero=3, offload_optimizer="cpu")
        >>> strategy.zero_stage, strategy.config["zero_optimization"]["offload_optimizer"]["device"]
        (3, 'cpu')
    """

    strategy_name = "memopt"

    def __init__(
        self,
        zero: Optional[int] = None,
        offload_optimizer: Union[bool, str] = False,
        offload_parameters: Union[bool, str] = False,
        nvme_path: Optional[str] = None,
        pin_memory: bool = False,
        reduce_bucket_size: Union[int, str] = "auto",
        allgather_bucket_size: Union[int, str] = "auto",
        prefetch_bucket_size: Union[int, str] = "auto",
        param_persistence_threshold: Union[int, str] = "auto",
        max_live_parameters: int = 1_000_000_000,
        contiguous_gradients: bool = True,
        overlap_comm: Optional[bool] = None,
        activation_checkpointing: Union[bool, float, str] = False,
        checkpointing_policy: Union[str, list[str]] = "auto",
        attention: Optional[str] = None,
        liger: Union[bool, dict[str, bool]] = False,
        memory_budget: Optional[Union[int, str]] = None,
        config: Optional[Union[str, Path, dict[str, Any]]] = None,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        logging_level: int = logging.WARN,
        load_full_weights: bool = False,
        exclude_frozen_parameters: bool = False,
    ) -> None:
        requires(_DEEPSPEED_AVAILABLE, "MemOptStrategy")
        self._transforms = validate_transforms(
            activation_checkpointing, checkpointing_policy, attention, liger, memory_budget
        )
        buckets = {
            "reduce_bucket_size": reduce_bucket_size,
            "allgather_bucket_size": allgather_bucket_size,
            "prefetch_bucket_size": prefetch_bucket_size,
            "param_persistence_threshold": param_persistence_threshold,
        }
        for name, value in buckets.items():
            validate_bucket(name, value)
        if config is not None:
            given = [name for name, value in buckets.items() if value != "auto"]
            given += [n for n, v in (("offload_optimizer", offload_optimizer), ("offload_parameters", offload_parameters)) if v]
            if given:
                raise ValueError(
                    f"Expected either `config` or the arguments {given}, got both."
                    " Fix: put these settings into the DeepSpeed `config`, or drop `config`."
                )
            loaded = self._load_config(config)
            if not isinstance(loaded, dict):
                raise TypeError(f"Expected `config` to be a dict or a path to a JSON file, got {type(config).__name__}.")
            stage = zero_stage_of(loaded)
            if zero is not None and zero != stage:
                raise ValueError(
                    f"Expected `zero` to match the config's zero_optimization.stage ({stage}), got zero={zero}."
                    " Fix: drop `zero` or change the stage in the config."
                )
            zero = stage
            zero_config = loaded.get("zero_optimization") or {}
            offload_optimizer = (zero_config.get("offload_optimizer") or {}).get("device") or False
            offload_parameters = (zero_config.get("offload_param") or {}).get("device") or False
            nvme_path = nvme_path or (zero_config.get("offload_optimizer") or {}).get("nvme_path") or (
                zero_config.get("offload_param") or {}
            ).get("nvme_path")
        zero = _DEFAULT_ZERO if zero is None else zero
        offload_optimizer = normalize_offload(offload_optimizer, "offload_optimizer")
        offload_parameters = normalize_offload(offload_parameters, "offload_parameters")
        validate_zero_settings(zero, offload_optimizer, offload_parameters, nvme_path)
        if config is None:
            config = build_deepspeed_config(
                zero,
                offload_optimizer=offload_optimizer,
                offload_parameters=offload_parameters,
                nvme_path=nvme_path,
                pin_memory=pin_memory,
                contiguous_gradients=contiguous_gradients,
                overlap_comm=overlap_comm,
                max_live_parameters=max_live_parameters,
            )
        super().__init__(
            accelerator=accelerator,
            config=config,
            logging_level=logging_level,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            load_full_weights=load_full_weights,
            exclude_frozen_parameters=exclude_frozen_parameters,
            remote_device=offload_parameters,
        )
        self.zero_stage = zero
        self.offload_optimizer = offload_optimizer
        self.offload_parameters = offload_parameters
        self.nvme_path = nvme_path
        self._bucket_arguments = buckets
        self._buckets_resolved = False

    # ------------------------------------------------------------------ environment and process group
    @override
    def setup_environment(self) -> None:
        if self.root_device.type == "cuda":
            super().setup_environment()
            return
        self._check_cpu_precision()
        # Lightning's DeepSpeedStrategy refuses non-CUDA accelerators; DDP's setup is all CPU needs.
        DDPStrategy.setup_environment(self)

    @override
    def setup_distributed(self) -> None:
        if self.root_device.type == "cuda":
            super().setup_distributed()
            return
        # Lightning validates CUDA device indices here, which CPU devices do not have.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()
        self._check_deepspeed_accelerator()

    def _check_cpu_precision(self) -> None:
        precision = self.precision_plugin.precision
        if precision not in _CPU_PRECISIONS:
            raise MisconfigurationException(
                f"Expected a precision DeepSpeed can run on CPU ({', '.join(_CPU_PRECISIONS)}), got {precision!r}."
                " fp16 needs a GPU. Fix: `Trainer(precision='bf16-mixed')` on CPU, or `accelerator='cuda'`."
            )

    @staticmethod
    def _check_deepspeed_accelerator() -> None:
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
        if name != "cpu":
            raise MisconfigurationException(
                f"Expected DeepSpeed's CPU accelerator with `accelerator='cpu'`, got DeepSpeed accelerator {name!r}."
                " Fix: set the environment variable `DS_ACCELERATOR=cpu` before starting, or train on the GPU."
            )

    # ------------------------------------------------------------------ transforms
    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        # After `configure_model` (and ZeRO-3's `zero.Init`), before DeepSpeed wraps the model.
        apply_transforms(self.lightning_module, self._transforms, self.root_device, trainer.precision, trainer)
        super().setup(trainer)

    # ------------------------------------------------------------------ config
    @override
    def _format_config(self) -> None:
        super()._format_config()
        self._resolve_bucket_sizes()

    def _resolve_bucket_sizes(self) -> None:
        if self._buckets_resolved or self.lightning_module is None:
            return
        module = self.lightning_module
        largest = max((p.numel() for p in module.parameters()), default=0)
        auto = auto_bucket_sizes(infer_hidden_size(module), largest)
        sizes = {k: (auto[k] if v == "auto" else v) for k, v in self._bucket_arguments.items()}
        apply_bucket_sizes(self.config, sizes)
        self._buckets_resolved = True

    @override
    def _format_batch_size_and_grad_accum_config(self) -> None:
        if self.lightning_module is None:
            return
        trainer = self.lightning_module.trainer
        accumulate = trainer.accumulate_grad_batches
        configured = self.config.pop("gradient_accumulation_steps", None)
        if configured is not None and configured != accumulate:
            raise MisconfigurationException(
                f"Expected the DeepSpeed config's `gradient_accumulation_steps` to equal the Trainer's"
                f" `accumulate_grad_batches` ({accumulate}), got {configured}."
                " Fix: drop it from the config and set `Trainer(accumulate_grad_batches=...)`."
            )
        loader_batch = self._auto_select_batch_size()
        micro = self.config.get("train_micro_batch_size_per_gpu")
        if micro is not None and micro != loader_batch and self.lightning_module.trainer.fit_loop._data_source.is_defined():
            raise MisconfigurationException(
                f"Expected the DeepSpeed config's `train_micro_batch_size_per_gpu` to equal the training"
                f" dataloader's batch size ({loader_batch}), got {micro}."
                " Fix: drop it from the config (it is read from the dataloader) or change the dataloader."
            )
        train_batch = self.config.get("train_batch_size")
        expected = (micro or loader_batch) * accumulate * self.world_size
        if train_batch is not None and train_batch != expected:
            raise MisconfigurationException(
                f"Expected the DeepSpeed config's `train_batch_size` to be micro-batch x accumulate_grad_batches x"
                f" world size = {expected}, got {train_batch}. Fix: drop `train_batch_size` from the config."
            )
        super()._format_batch_size_and_grad_accum_config()

    @override
    def _init_optimizers(self) -> tuple[Optimizer, Any]:
        from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers

        optimizers, schedulers = _init_optimizers_and_lr_schedulers(self.lightning_module)
        if len(optimizers) != 1 or len(schedulers) > 1:
            raise MisconfigurationException(
                f"Expected one optimizer and at most one LR scheduler from `configure_optimizers` with DeepSpeed,"
                f" got {len(optimizers)} optimizers and {len(schedulers)} schedulers."
                " Fix: return a single optimizer (use parameter groups for different settings)."
            )
        return optimizers[0], schedulers[0] if schedulers else None

    # ------------------------------------------------------------------ engine
    @override
    def _setup_model_and_optimizer(self, model: Module, optimizer: Optional[Optimizer], lr_scheduler: Any = None):
        with self._device_rank_for_deepspeed():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    @override
    def _initialize_deepspeed_inference(self, model: Module) -> None:
        with self._device_rank_for_deepspeed():
            super()._initialize_deepspeed_inference(model)

    @contextmanager
    def _device_rank_for_deepspeed(self) -> Iterator[None]:
        """Lightning passes ``args.device_rank = root_device.index`` to ``deepspeed.initialize``; a CPU device has
        no index (``None``), which ``DeepSpeedEngine._set_distributed_vars`` compares with ``>= 0``. Give
        DeepSpeed the local rank instead, for the duration of the call."""
        import deepspeed

        if self.root_device.index is not None:
            yield
            return
        original = deepspeed.initialize
        local_rank = self.local_rank

        def initialize(*args: Any, **kwargs: Any) -> Any:
            namespace = kwargs.get("args")
            if isinstance(namespace, argparse.Namespace) and getattr(namespace, "device_rank", 0) is None:
                namespace.device_rank = local_rank
            return original(*args, **kwargs)

        deepspeed.initialize = initialize
        try:
            yield
        finally:
            deepspeed.initialize = original

    @override
    def teardown(self) -> None:
        super().teardown()
        _restore_torch_linear()

    @property
    def deepspeed_engine(self) -> "deepspeed.DeepSpeedEngine":
        """The :class:`deepspeed.DeepSpeedEngine` that wraps the LightningModule after setup."""
        return self.model

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register("memopt_zero1", cls, override=True, description="MemOptStrategy, ZeRO stage 1", zero=1)
        strategy_registry.register("memopt_zero2", cls, override=True, description="MemOptStrategy, ZeRO stage 2", zero=2)
        strategy_registry.register("memopt_zero3", cls, override=True, description="MemOptStrategy, ZeRO stage 3", zero=3)
        strategy_registry.register(
            "memopt_zero3_offload",
            cls,
            override=True,
            description="MemOptStrategy, ZeRO stage 3 with optimizer and parameters offloaded to CPU",
            zero=3,
            offload_optimizer="cpu",
            offload_parameters="cpu",
        )


def _restore_torch_linear() -> None:
    """Undo ZeRO-3's process-wide replacement of ``torch.nn.functional.linear`` (``zero.Init`` swaps in its
    ``zero3_linear_wrap`` and leaves it, "This will persist unless manually reset"), so models trained or traced
    later in the process run PyTorch's own linear. The next ZeRO-3 ``zero.Init`` swaps it in again."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original
