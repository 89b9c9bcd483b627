"""The strategy's transform options: validated at construction, applied at setup (one place for both)."""

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from lightning_memopt.predictor.precision import resolve_precision
from lightning_memopt.transforms import apply_activation_checkpointing, apply_attention, apply_liger
from lightning_memopt.transforms.attention import IMPLEMENTATIONS
from lightning_memopt.transforms.checkpointing import _validate_selection
from lightning_memopt.transforms.liger import DEFAULT_KERNELS
from lightning_memopt.transforms.liger import _validate as _validate_liger

@dataclass(frozen=True)
class TransformSettings:
    """What to apply: ``fraction`` of blocks checkpointed (``None``: none), attention name, Liger switches."""

    fraction: Optional[float] = None
    policy: Union[str, list[str]] = "auto"
    attention: Optional[str] = None
    liger: Optional[dict[str, bool]] = None
    liger_strict: bool = True


def validate_transforms(
    activation_checkpointing: Union[bool, float],
    policy: Union[str, list[str]],
    attention: Optional[str],
    liger: Union[bool, dict[str, bool]],
) -> TransformSettings:
    """Check the strategy's transform arguments; raise ``ValueError``/``TypeError`` with the fix.

    Example:
        >>> validate_transforms(True, "auto", "sdpa", False).fraction
        1.0
        >>> validate_transforms(1.5, "auto", None, False)
        Traceback (most recent call last):
        ...
        ValueError: Expected `fraction` in (0, 1], got 1.5. Fix: e.g. fraction=0.5 for half the blocks.
    """
    if activation_checkpointing is True:
        fraction: Optional[float] = 1.0
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
    switches: Optional[dict[str, bool]] = None
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
    return TransformSettings(fraction=fraction, policy=policy, attention=attention, liger=switches, liger_strict=strict)


def apply_transforms(module: nn.Module, settings: TransformSettings, device: torch.device, precision: str) -> None:
    """Apply ``settings`` to ``module`` (attention first, then Liger, then checkpointing of the patched blocks)."""
    if settings.attention is not None:
        dtype = resolve_precision(precision).compute_dtype
        apply_attention(module, settings.attention, device=device, dtype=dtype)
    if settings.liger is not None:
        apply_liger(module, **settings.liger, strict=settings.liger_strict, device=device)
    if settings.fraction is not None:
        policy = set(settings.policy) if isinstance(settings.policy, (list, tuple)) else settings.policy
        apply_activation_checkpointing(module, policy, fraction=settings.fraction)
