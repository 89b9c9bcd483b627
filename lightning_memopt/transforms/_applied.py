"""One record of what the transforms applied, kept on the root module (the single source of truth).

Each transform writes its entry under ``module._memopt_applied[<key>]``; the strategy, the callbacks and the
planner read it back through :func:`applied_transforms` (the predictor reads the module itself).
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
