"""The strategy's transform options: validated at construction, applied at setup (one place for both)."""

from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_memopt.planning.budget import CheckpointPlan, _parse_budget, checkpoint_to_fit
from lightning_memopt.predictor.precision import resolve_precision
from lightning_memopt.transforms import apply_activation_checkpointing, apply_attention, apply_liger
from lightning_memopt.transforms.attention import IMPLEMENTATIONS
from lightning_memopt.transforms.checkpointing import _validate_selection
from lightning_memopt.transforms.liger import DEFAULT_KERNELS
from lightning_memopt.transforms.liger import _validate as _validate_liger

#: the share of a CUDA device's memory a default budget leaves free (CUDA context, allocator fragmentation)
DEVICE_MARGIN = 0.1

@dataclass(frozen=True)
class TransformSettings:
    """What to apply: ``fraction`` of blocks checkpointed (``None``: none), attention name, Liger switches.

    ``budget_mode`` checkpoints the fewest blocks that fit ``budget`` bytes (``None``: the device's memory).
    """

    fraction: float | None = None
    budget_mode: bool = False
    budget: int | None = None
    policy: str | list[str] = "auto"
    attention: str | None = None
    liger: dict[str, bool] | None = None
    liger_strict: bool = True


def validate_transforms(
    activation_checkpointing: bool | float | str,
    policy: str | list[str],
    attention: str | None,
    liger: bool | dict[str, bool],
    memory_budget: float | str | None = None,
) -> TransformSettings:
    """Check the strategy's transform arguments; raise ``ValueError``/``TypeError`` with the fix.

    Example:
        >>> validate_transforms(True, "auto", "sdpa", False).fraction
        1.0
        >>> validate_transforms("budget", "auto", None, False, memory_budget="1GiB").budget
        1073741824
        >>> validate_transforms(1.5, "auto", None, False)
        Traceback (most recent call last):
        ...
        ValueError: Expected `fraction` in (0, 1], got 1.5. Fix: e.g. fraction=0.5 for half the blocks.
    """
    budget_mode = isinstance(activation_checkpointing, str)
    if budget_mode and activation_checkpointing != "budget":
        raise ValueError(
            "Expected `activation_checkpointing` to be a bool, a fraction in (0, 1] or 'budget', got"
            f" {activation_checkpointing!r}. Fix: e.g. activation_checkpointing='budget',"
            " memory_budget='24GiB'."
        )
    if memory_budget is not None and not budget_mode:
        raise ValueError(
            "Expected `memory_budget` only with activation_checkpointing='budget', got"
            f" memory_budget={memory_budget!r} with activation_checkpointing={activation_checkpointing!r}."
            " Fix: set activation_checkpointing='budget' or drop memory_budget."
        )
    budget = None if memory_budget is None else _parse_budget(memory_budget)
    if budget_mode:
        fraction: float | None = None
    elif activation_checkpointing is True:
        fraction = 1.0
    elif activation_checkpointing is False or activation_checkpointing is None:
        fraction = None
    else:
        _validate_selection(activation_checkpointing, None)
        fraction = float(activation_checkpointing)
    if attention is not None and attention not in IMPLEMENTATIONS:
        raise ValueError(
            f"Expected `attention` to be None or one of {IMPLEMENTATIONS}, got {attention!r}."
            " Fix: e.g. `MemOptStrategy(attention='sdpa')`."
        )
    switches: dict[str, bool] | None = None
    strict = True
    if liger is True:
        switches = dict(DEFAULT_KERNELS)
    elif isinstance(liger, dict):
        unknown = set(liger) - set(DEFAULT_KERNELS) - {"strict"}
        if unknown:
            raise ValueError(
                f"Expected Liger switches among {sorted(DEFAULT_KERNELS)} and 'strict', got {sorted(unknown)}."
            )
        strict = bool(liger.get("strict", True))
        switches = {**DEFAULT_KERNELS, **{k: v for k, v in liger.items() if k != "strict"}}
        _validate_liger(switches, "cuda", False, nn.Module())
    elif liger is not False and liger is not None:
        raise TypeError(f"Expected `liger` to be a bool or a dict of kernel switches, got {liger!r}.")
    return TransformSettings(
        fraction=fraction, budget_mode=budget_mode, budget=budget, policy=policy, attention=attention,
        liger=switches, liger_strict=strict,
    )


def apply_transforms(
    module: nn.Module,
    settings: TransformSettings,
    device: torch.device,
    precision: str,
    trainer: Any | None = None,
) -> None:
    """Apply ``settings`` to ``module``: attention, then Liger, then checkpointing of the patched blocks.

    Budget mode needs the ``trainer`` (its batch shape, strategy and precision tell the predictor).
    """
    if settings.attention is not None:
        dtype = resolve_precision(precision).compute_dtype
        apply_attention(module, settings.attention, device=device, dtype=dtype)
    if settings.liger is not None:
        apply_liger(module, **settings.liger, strict=settings.liger_strict, device=device)
    if settings.fraction is not None:
        policy = set(settings.policy) if isinstance(settings.policy, (list, tuple)) else settings.policy
        apply_activation_checkpointing(module, policy, fraction=settings.fraction)
    if settings.budget_mode:
        if trainer is None:
            raise ValueError("Expected the Trainer for activation_checkpointing='budget', got none.")
        policy = set(settings.policy) if isinstance(settings.policy, (list, tuple)) else settings.policy
        checkpoint_run_to_fit(trainer, module, settings.budget, policy)


def checkpoint_run_to_fit(
    trainer: Any, pl_module: nn.Module, budget: int | None, policy: Any = "auto", reentrant: bool = False
) -> CheckpointPlan | None:
    """Checkpoint the fewest blocks of ``pl_module`` that make the predicted peak of this run fit ``budget``.

    The predictor is told the module and the run: the strategy (ZeRO stage, offload, DeepSpeed config),
    world size, precision, the optimizer ``configure_optimizers`` returns, what the other transforms applied,
    and the micro-batch size and sequence length of the first batch of the training dataloader. Only ``fit``
    plans (checkpointing does nothing without a backward pass); other stages return ``None``.

    Args:
        trainer: the Trainer.
        pl_module: the LightningModule.
        budget: bytes per rank; ``None``: the CUDA device's total memory less :data:`DEVICE_MARGIN`.
        policy: the candidate blocks (see ``blocks_to_checkpoint``).
        reentrant: use the reentrant checkpoint implementation.

    Raises:
        MisconfigurationException: no budget on a CPU device, or no training batch with a (batch, sequence)
            shape to plan for.
        ValueError: a budget below the predicted peak with every block checkpointed.
    """
    from lightning.pytorch.trainer.states import TrainerFn

    from lightning_memopt.lightning._run_reader import lightning_step, read_run

    if trainer.state.fn != TrainerFn.FITTING:
        rank_zero_info(f"Budget-driven checkpointing plans for `fit` only; skipped for {trainer.state.fn}.")
        return None
    device = trainer.strategy.root_device
    if budget is None:
        if device.type != "cuda":
            raise MisconfigurationException(
                "Expected an explicit memory budget for budget-driven checkpointing on a"
                f" {device.type!r} device, got none (only a CUDA device's memory is known). Fix: e.g."
                " MemOptStrategy(activation_checkpointing='budget', memory_budget='8GiB') or"
                " ActivationCheckpointing(budget='8GiB')."
            )
        budget = int(torch.cuda.get_device_properties(device).total_memory * (1 - DEVICE_MARGIN))
    run = read_run(trainer)
    shape = run.batch_shape()
    if shape is None or shape[1] is None:
        raise MisconfigurationException(
            "Expected the first training batch to hold a (batch, sequence) tensor for budget-driven"
            f" checkpointing, got shape {shape}. Fix: give the batch `input_ids` of shape (batch, seq_len),"
            " or call checkpoint_to_fit(model, budget, micro_batch_size=..., seq_len=...) yourself."
        )
    optimizer = run.optimizer_name()
    if optimizer is None:
        rank_zero_info("Budget-driven checkpointing: optimizer unknown at setup; predicting with AdamW.")
    kwargs = run.estimate_kwargs(shape, optimizer or "adamw")
    kwargs.pop("activation_checkpointing", None)
    kwargs["example_batch"] = run.first_batch()
    with lightning_step(pl_module):
        plan = checkpoint_to_fit(pl_module, budget, policy=policy, reentrant=reentrant, **kwargs)
    rank_zero_info(f"Budget-driven checkpointing: {plan}")
    return plan

