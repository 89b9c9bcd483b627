"""The setup-time half of :class:`~lightning_memopt.MemOptStrategy`'s DeepSpeed config: what needs the Trainer
(batch sizes from the training DataLoader, the precision) and the checks that go with it."""

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import WarningCache

from lightning_memopt.lightning.strategies.arguments import CHECKPOINTING_KNOBS
from lightning_memopt.lightning.strategies.transforms import TransformSettings

_FP16_PRECISIONS = ("16-mixed", "16-true")
_CPU_PRECISIONS = ("bf16-mixed", "bf16-true", "32-true")
_warning_cache = WarningCache()


def format_batch_sizes(config: dict[str, Any], trainer: "pl.Trainer", world_size: int) -> None:
    """Reconcile the config's batch keys with the Trainer, in place, before Lightning fills in the rest.

    ``gradient_accumulation_steps`` may stay when it equals ``accumulate_grad_batches`` (Lightning always refuses
    it); ``train_micro_batch_size_per_gpu`` given by the user is kept, as Lightning does, with one warning when the
    training DataLoader's batch size differs; otherwise it is read from the DataLoader (:func:`micro_batch_size`).
    A ``train_batch_size`` DeepSpeed would reject (it asserts micro x accumulation x world size) is refused here.

    Raises:
        MisconfigurationException: ``gradient_accumulation_steps`` or ``train_batch_size`` that contradict the
            Trainer, or a training DataLoader without a batch size and no micro-batch size in the config.
    """
    accumulate = trainer.accumulate_grad_batches
    configured = config.pop("gradient_accumulation_steps", None)
    if configured is not None and configured != accumulate:
        raise MisconfigurationException(
            f"Expected the DeepSpeed config's `gradient_accumulation_steps` to equal the Trainer's"
            f" `accumulate_grad_batches` ({accumulate}), got {configured}."
            " Fix: drop it from the config and set `Trainer(accumulate_grad_batches=...)`."
        )
    micro = config.get("train_micro_batch_size_per_gpu")
    if micro is None:
        micro = config["train_micro_batch_size_per_gpu"] = micro_batch_size(trainer)
    else:
        loader = _run(trainer).loader_batch_size()
        if loader is not None and loader != micro:
            _warning_cache.warn(
                f"The DeepSpeed config's `train_micro_batch_size_per_gpu` ({micro}) differs from the training"
                f" DataLoader's batch size ({loader}); it is kept, as Lightning keeps it (DeepSpeed uses it for"
                " throughput logs and `train_batch_size`). Drop it to have it read from the DataLoader."
            )
    train_batch = config.get("train_batch_size")
    expected = micro * accumulate * world_size
    if train_batch is not None and train_batch != expected:
        raise MisconfigurationException(
            f"Expected the DeepSpeed config's `train_batch_size` to be micro-batch x accumulate_grad_batches x"
            f" world size = {expected}, got {train_batch}. Fix: drop `train_batch_size` from the config."
        )


def micro_batch_size(trainer: "pl.Trainer") -> int:
    """DeepSpeed's ``train_micro_batch_size_per_gpu`` from the training DataLoader (the one the run reader shares:
    built once per fit); 1 without training data (validate, test, predict), as in Lightning.

    Raises:
        MisconfigurationException: the training data has no batch size to read (``DataLoader(batch_size=None)``,
            a batch sampler without ``batch_size``, or another iterable), where Lightning fails with an
            ``AttributeError``.
    """
    from lightning_memopt.lightning._compat import train_source_defined

    if not train_source_defined(trainer):
        return 1
    size = _run(trainer).loader_batch_size()
    if size is None:
        got = f"a {type(_run(trainer).train_loader()).__name__} without a batch size"
        raise MisconfigurationException(
            "Expected a training DataLoader with a batch size (MemOptStrategy hands it to DeepSpeed as"
            f" `train_micro_batch_size_per_gpu`), got {got}. Fix: `DataLoader(batch_size=N)`, or give the size of"
            " the batches your data yields: `MemOptStrategy(logging_batch_size_per_gpu=N)` or"
            " `train_micro_batch_size_per_gpu` in the DeepSpeed config."
        )
    return size


def _run(trainer: "pl.Trainer") -> Any:
    from lightning_memopt.lightning._run_reader import read_run

    return read_run(trainer)


def check_checkpointing_conflict(config: dict[str, Any], transforms: TransformSettings) -> None:
    """Refuse DeepSpeed's checkpointing settings together with the strategy's own activation checkpointing.

    Raises:
        ValueError: both are set (DeepSpeed's settings would not apply to the blocks the strategy checkpoints).
    """
    section = config.get("activation_checkpointing") or {}
    knobs = [name for name in CHECKPOINTING_KNOBS if section.get(name)]
    if knobs and (transforms.fraction is not None or transforms.budget_mode):
        raise ValueError(
            f"Expected either `activation_checkpointing` (torch's checkpoint, applied by the strategy) or"
            f" DeepSpeed's checkpointing settings {knobs}, got both. DeepSpeed's settings act only where the model"
            " calls `deepspeed.checkpointing.checkpoint`, not on the blocks the strategy checkpoints."
            " Fix: drop one of them."
        )


def check_checkpointing_section(config: dict[str, Any]) -> None:
    """Check what ``deepspeed.checkpointing.configure`` asserts, before the engine is built.

    Raises:
        MisconfigurationException: contiguous checkpoint buffers without partitioned activations or without
            ``number_checkpoints`` (which sizes them).
    """
    section = config.get("activation_checkpointing") or {}
    if not section.get("contiguous_memory_optimization"):
        return
    missing = [key for key in ("partition_activations", "number_checkpoints") if not section.get(key)]
    if missing:
        raise MisconfigurationException(
            f"Expected {missing} in the DeepSpeed config's `activation_checkpointing` section with"
            f" contiguous_memory_optimization=True, got {section}. DeepSpeed sizes the contiguous buffer from"
            " `number_checkpoints` (the number of `deepspeed.checkpointing.checkpoint` calls per forward) and asserts"
            " partitioned activations. Fix: add them to the config's section, or contiguous_memory_optimization=False."
        )


def warn_unused_loss_scaling(names: list[str], precision: str) -> None:
    """Warn once that fp16 loss-scaling arguments do nothing with another precision (Lightning ignores them)."""
    if names and precision not in _FP16_PRECISIONS:
        _warning_cache.warn(
            f"The fp16 loss-scaling arguments {names} apply only to precision '16-mixed' or '16-true'; with"
            f" {precision!r} nothing scales the loss and they have no effect."
        )


def check_cpu_precision(precision: str) -> None:
    """Refuse a precision DeepSpeed cannot train with on CPU (fp16 and its loss scaling need a GPU).

    Raises:
        MisconfigurationException: for ``16-mixed``/``16-true`` (or anything else outside bf16 and fp32).
    """
    if precision not in _CPU_PRECISIONS:
        raise MisconfigurationException(
            f"Expected a precision DeepSpeed can run on CPU ({', '.join(_CPU_PRECISIONS)}), got {precision!r}."
            " fp16 needs a GPU. Fix: `Trainer(precision='bf16-mixed')` on CPU, or `accelerator='cuda'`."
        )


def check_deepspeed_cpu_accelerator() -> None:
    """Check that DeepSpeed picked its CPU accelerator for a CPU run.

    Raises:
        MisconfigurationException: DeepSpeed selected another accelerator (e.g. a GPU is visible).
    """
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name != "cpu":
        raise MisconfigurationException(
            f"Expected DeepSpeed's CPU accelerator with `accelerator='cpu'`, got DeepSpeed accelerator {name!r}."
            " Fix: set the environment variable `DS_ACCELERATOR=cpu` before starting, or train on the GPU."
        )
