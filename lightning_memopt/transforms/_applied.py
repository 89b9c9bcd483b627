"""One record of what the transforms applied, kept on the root module (the single source of truth).

Each transform writes its entry under ``module._memopt_applied[<key>]``; the predictor and the strategy read
it back through :func:`applied_transforms`, so a prediction follows what was really applied.
"""

from typing import Any

from torch import nn

_ATTR = "_memopt_applied"


def applied_transforms(module: nn.Module) -> dict[str, Any]:
    """Return a copy of what the ``lightning_memopt`` transforms applied to ``module`` (empty when none).

    Keys: ``"activation_checkpointing"`` (``blocks``, ``fraction``, ...), ``"attention"`` (the implementation
    name) and ``"liger"`` (the kernels per model), each present only when that transform ran.

    Example:
        >>> from torch import nn
        >>> applied_transforms(nn.Linear(2, 2))
        {}
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected an nn.Module, got {type(module).__name__}. Fix: pass the model itself.")
    return {key: _copy(value) for key, value in getattr(module, _ATTR, {}).items()}


def predictor_settings(module: nn.Module) -> dict[str, Any]:
    """What the transforms applied to ``module``, as :func:`~lightning_memopt.predictor.estimate_memory` keywords:
    ``activation_checkpointing`` (``True`` or the fraction of blocks), ``attention`` and ``liger``.

    Without an attention transform, the attention of a Hugging Face config inside the module is used.

    Example:
        >>> predictor_settings(nn.Linear(2, 2))
        {'activation_checkpointing': False, 'liger': False}
    """
    applied = applied_transforms(module)
    out: dict[str, Any] = {"activation_checkpointing": False, "liger": False}
    ckpt = applied.get("activation_checkpointing")
    if ckpt:
        fraction = float(ckpt.get("fraction", 1.0))
        out["activation_checkpointing"] = True if fraction >= 1.0 else fraction
    attention = applied.get("attention")
    if attention is None:
        for sub in module.modules():
            attention = getattr(getattr(sub, "config", None), "_attn_implementation", None)
            if attention:
                break
    if isinstance(attention, str) and attention:
        out["attention"] = attention
    liger = applied.get("liger")
    if liger:
        kernels = {kernel for model in liger.get("models", []) for kernel in model.get("kernels", [])}
        if liger.get("rms_norm_modules"):
            kernels.add("rms_norm")
        out["liger"] = {kernel: True for kernel in sorted(kernels)} if kernels else False
    return out


def _record(module: nn.Module, key: str, value: Any) -> None:
    """Store ``value`` under ``key`` in the root module's record (replacing an earlier entry)."""
    record = module.__dict__.setdefault(_ATTR, {})
    record[key] = value


def _forget(module: nn.Module, key: str) -> None:
    """Drop ``key`` from the root module's record, if present."""
    module.__dict__.get(_ATTR, {}).pop(key, None)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
