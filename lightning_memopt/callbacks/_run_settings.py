"""Read a run's memory-relevant settings from the Trainer, as ``estimate_memory`` keyword arguments.

The glue between a live Lightning run and the pure predictor: the strategy (ZeRO stage, offload, DeepSpeed config),
the world size, the precision, the optimizer, what the ``lightning_memopt`` transforms applied, and the batch shape.
"""

import copy
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_memopt.predictor.timeline import batch_shape
from lightning_memopt.transforms._applied import predictor_settings

__all__ = ["batch_shape", "optimizer_from_module", "optimizer_name", "run_settings", "strategy_settings"]

#: torch optimizer class name -> predictor optimizer name (``foreach``/``fused`` and momentum are read from defaults).
_OPTIMIZER_NAMES = {
    "adamw": "adamw",
    "adam": "adam",
    "sgd": "sgd",
    "fusedadam": "adamw",
    "deepspeedcpuadam": "adamw",
}


def optimizer_name(optimizer: Any) -> str:
    """The predictor's name for an optimizer instance (unwrapping Lightning's and DeepSpeed's wrappers).

    Raises:
        MisconfigurationException: for an optimizer the predictor does not know, with the fix.

    Example:
        >>> optimizer_name(torch.optim.AdamW([nn.Parameter(torch.zeros(1))], foreach=True))
        'adamw-foreach'
        >>> optimizer_name(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9))
        'sgd-momentum'
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
        # torch picks foreach by itself when every parameter is on CUDA (torch/optim/optimizer.py, _default_to_fused_or_foreach)
        params = [p for group in getattr(optimizer, "param_groups", []) for p in group["params"]]
        if defaults.get("foreach") is None and params and all(p.device.type == "cuda" for p in params):
            return f"{base}-foreach"
    return base


def optimizer_from_module(pl_module: Any) -> str | None:
    """The optimizer ``configure_optimizers`` would build, before the Trainer builds it (``None`` if unknown).

    It calls ``configure_optimizers`` once and throws the result away (optimizers allocate their states lazily, at
    the first step). Returns ``None`` when that call fails (e.g. it needs the strategy set up).
    """
    try:
        result = pl_module.configure_optimizers()
    except Exception:  # noqa: BLE001 -- the real call happens later, during strategy setup; the caller then re-predicts
        return None
    while isinstance(result, (list, tuple)) and result:
        result = result[0]
    if isinstance(result, Mapping):
        result = result.get("optimizer")
    if isinstance(result, torch.optim.Optimizer) or hasattr(result, "param_groups"):
        return optimizer_name(result)
    return None


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
        if getattr(strategy, "_buckets_resolved", True) is False and pl_module is not None:
            from lightning_memopt.strategies.deepspeed_config import (
                apply_bucket_sizes,
                auto_bucket_sizes,
                infer_hidden_size,
            )

            largest = max((p.numel() for p in pl_module.parameters()), default=0)
            auto = auto_bucket_sizes(infer_hidden_size(pl_module), largest)
            arguments = getattr(strategy, "_bucket_arguments", {})
            apply_bucket_sizes(config, {k: auto[k] if v == "auto" else v for k, v in arguments.items()})
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


def run_settings(
    trainer: Any, pl_module: nn.Module, shape: tuple[int, int | None], optimizer: str
) -> dict[str, Any]:
    """All ``estimate_memory`` keyword arguments but ``model``, for the run of ``trainer`` at a batch ``shape``.

    ``accumulate_grad_batches`` is the Trainer's (gradient accumulation keeps gradients between micro-steps).
    """
    settings = strategy_settings(trainer.strategy, pl_module)
    settings.update(predictor_settings(pl_module))
    settings.update(
        world_size=int(trainer.world_size),
        precision=str(trainer.precision),
        optimizer=optimizer,
        micro_batch_size=int(shape[0]),
        accumulate_grad_batches=int(trainer.accumulate_grad_batches),
    )
    if shape[1] is not None:
        settings["seq_len"] = int(shape[1])
    return settings
