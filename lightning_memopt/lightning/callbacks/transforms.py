"""Callbacks that apply ``lightning_memopt.transforms`` to the LightningModule under any strategy.

For users who keep their own strategy (single device, DDP, Lightning's ``DeepSpeedStrategy``).

Each applies its transform in ``setup``, before the strategy wraps the model. When the module builds its
layers in ``configure_model`` (which Lightning calls after ``setup``, e.g. under ZeRO-3 initialisation), the
transform runs right after ``configure_model`` instead, still before DeepSpeed wraps the model. What was
applied is recorded on the module: ``lightning_memopt.transforms.applied_transforms(pl_module)``. None of them
logs metrics.
"""

from types import MethodType

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_memopt.lightning._run_reader import ReadsRun
from lightning_memopt.lightning.strategies.transforms import checkpoint_run_to_fit
from lightning_memopt.planning.budget import CheckpointPlan, _parse_budget
from lightning_memopt.predictor.precision import resolve_precision
from lightning_memopt.transforms import apply_activation_checkpointing, apply_attention, apply_liger
from lightning_memopt.transforms._applied import applied_transforms
from lightning_memopt.transforms.attention import IMPLEMENTATIONS
from lightning_memopt.transforms.checkpointing import Policy, _validate_selection
from lightning_memopt.transforms.liger import KERNELS as LIGER_KERNELS
from lightning_memopt.transforms.liger import _validate as _validate_liger

_PENDING = "_memopt_pending_transforms"


class _TransformCallback(Callback):
    _key = ""

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._apply_now_or_after_configure_model(trainer, pl_module)

    def _apply_now_or_after_configure_model(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule"
    ) -> None:
        if self._key in applied_transforms(pl_module):
            return  # applied in an earlier stage
        if not is_overridden("configure_model", pl_module):
            self._apply(trainer, pl_module)
            return
        pending = pl_module.__dict__.get(_PENDING)
        if pending is None:  # the first of these callbacks wraps configure_model; the others queue behind it
            pending = pl_module.__dict__[_PENDING] = []
            original = pl_module.configure_model

            def configure_model(module: "pl.LightningModule") -> None:
                original()
                del module.__dict__["configure_model"]
                for apply in module.__dict__.pop(_PENDING):
                    apply()

            pl_module.configure_model = MethodType(configure_model, pl_module)  # type: ignore[method-assign]
        if self not in [getattr(apply, "__self__", None) for apply in pending]:
            pending.append(MethodType(lambda cb: cb._apply(trainer, pl_module), self))

    def _apply(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        raise NotImplementedError


class ActivationCheckpointing(_TransformCallback, ReadsRun):
    """Checkpoint the repeated blocks of the LightningModule (see ``apply_activation_checkpointing``).

    With ``budget``, the fewest leading blocks whose predicted step peak fits the budget are checkpointed (see
    ``checkpoint_to_fit``), planned at ``fit`` setup for this run's strategy, precision, optimizer and the
    micro-batch size and sequence length of the first batch of the training dataloader.

    Args:
        policy: ``"auto"``, a class, a class name, a set of those, or a callable ``module -> bool``.
        fraction: checkpoint the first ``ceil(fraction * n)`` blocks, ``0 < fraction <= 1``.
        every_k: checkpoint every ``every_k``-th block.
        reentrant: use the reentrant implementation.
        budget: memory per rank (bytes or ``"24GiB"``), or ``"device"`` for the CUDA device's total memory
            less 10 %; exclusive with ``fraction`` and ``every_k``.

    Raises:
        ValueError: a bad ``fraction``/``every_k``/``budget`` here; a policy that matches nothing, or a budget
            below the predicted peak with every block checkpointed, in ``setup``.
        MisconfigurationException: ``budget="device"`` on CPU, in ``setup``.

    Example:
        >>> ActivationCheckpointing(fraction=0.5)  # doctest: +ELLIPSIS
        <...ActivationCheckpointing object at ...>
        >>> ActivationCheckpointing(budget="24GiB").budget
        25769803776
    """

    _key = "activation_checkpointing"

    def __init__(
        self,
        policy: Policy = "auto",
        fraction: float | None = None,
        every_k: int | None = None,
        reentrant: bool = False,
        budget: int | str | None = None,
    ) -> None:
        _validate_selection(fraction, every_k)
        if not isinstance(reentrant, bool):
            raise TypeError(f"Expected `reentrant` to be a bool, got {reentrant!r}.")
        if budget is not None and (fraction is not None or every_k is not None):
            raise ValueError(
                f"Expected either `budget` or `fraction`/`every_k`, got budget={budget!r},"
                f" fraction={fraction!r}, every_k={every_k!r}. Fix: drop `fraction`/`every_k`; the budget"
                " decides how many blocks."
            )
        if budget is not None and budget != "device":
            budget = _parse_budget(budget)
        self.policy, self.fraction, self.every_k, self.reentrant = policy, fraction, every_k, reentrant
        self.budget = budget
        self.plan: CheckpointPlan | None = None
        if budget is not None:
            self._key = "checkpoint_plan"  # recorded even when no block needs checkpointing

    def _apply(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.budget is not None:
            budget = None if self.budget == "device" else self.budget
            self.plan = checkpoint_run_to_fit(trainer, pl_module, budget, self.policy, self.reentrant)
            return
        apply_activation_checkpointing(
            pl_module, self.policy, fraction=self.fraction, every_k=self.every_k, reentrant=self.reentrant
        )


class FlashAttention(_TransformCallback):
    """Switch the attention implementation of the LightningModule's models (see ``apply_attention``).

    ``"auto"`` resolves against the Trainer's device and precision (flash-attn needs CUDA and bf16/fp16).

    Args:
        implementation: ``"auto"``, ``"flash_attention_2"``, ``"sdpa"`` or ``"eager"``.

    Raises:
        ValueError: an unknown name here; flash_attention_2 on CPU or without fp16/bf16 in ``setup``.
        ModuleNotFoundError: flash_attention_2 without flash-attn, in ``setup``.

    Example:
        >>> FlashAttention("sdpa").implementation
        'sdpa'
    """

    _key = "attention"

    def __init__(self, implementation: str = "auto") -> None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"Expected the attention implementation to be one of {IMPLEMENTATIONS}, got"
                f" {implementation!r}."
            )
        self.implementation = implementation

    def _apply(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        apply_attention(
            pl_module,
            self.implementation,
            device=trainer.strategy.root_device,
            dtype=resolve_precision(trainer.precision).compute_dtype,
        )


class LigerKernel(_TransformCallback):
    """Patch the LightningModule's models with Liger kernels (see ``apply_liger``); needs a CUDA device.

    Args:
        rms_norm: Liger RMSNorm.
        rope: Liger rotary embedding.
        swiglu: Liger SwiGLU MLP.
        cross_entropy: Liger cross-entropy (exclusive with ``fused_linear_cross_entropy``).
        fused_linear_cross_entropy: fused ``lm_head`` + cross-entropy (logits are not returned in training).
        strict: raise for an unsupported model type (``False``: warn once on rank zero and skip it).

    Raises:
        ValueError: both cross-entropy switches here; a non-CUDA device or an unsupported model in ``setup``.

    Example:
        >>> LigerKernel(cross_entropy=True, fused_linear_cross_entropy=False).strict
        True
    """

    _key = "liger"

    def __init__(
        self,
        rms_norm: bool = True,
        rope: bool = True,
        swiglu: bool = True,
        cross_entropy: bool = False,
        fused_linear_cross_entropy: bool = True,
        strict: bool = True,
    ) -> None:
        self.switches = dict(zip(LIGER_KERNELS, (rms_norm, rope, swiglu, cross_entropy, fused_linear_cross_entropy)))
        _validate_liger(self.switches, "cuda", False, torch.nn.Module())
        self.strict = strict

    def _apply(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        apply_liger(pl_module, **self.switches, strict=self.strict, device=trainer.strategy.root_device)
