"""lightning_memopt: make large models fit in Lightning, and know where the memory goes.

The package root is lazy (PEP 562): ``import lightning_memopt`` imports neither Lightning nor DeepSpeed, so the
predictor and the command line start fast. A name is imported when it is first used. The strategy names
``memopt_zero1`` ... ``memopt_zero3_offload`` are registered with Lightning when Lightning is loaded
(:mod:`lightning_memopt.lightning._registration`), so that ``Trainer(strategy="memopt_zero3")`` works after a bare
``import lightning_memopt``.
"""

import importlib
from typing import Any

from lightning_memopt.lightning import _registration

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "ActivationCheckpointing": "lightning_memopt.lightning.callbacks",
    "BatchPlanner": "lightning_memopt.lightning.callbacks",
    "FlashAttention": "lightning_memopt.lightning.callbacks",
    "LigerKernel": "lightning_memopt.lightning.callbacks",
    "MemoryMonitor": "lightning_memopt.lightning.callbacks",
    "MemOptStrategy": "lightning_memopt.lightning.strategies",
    "MemoryEstimate": "lightning_memopt.predictor",
    "estimate_memory": "lightning_memopt.planning",
    "plan_batch": "lightning_memopt.planning",
    "apply_activation_checkpointing": "lightning_memopt.transforms",
    "apply_attention": "lightning_memopt.transforms",
    "apply_liger": "lightning_memopt.transforms",
}
__all__ = [
    "ActivationCheckpointing",
    "BatchPlanner",
    "FlashAttention",
    "LigerKernel",
    "MemOptStrategy",
    "MemoryEstimate",
    "MemoryMonitor",
    "apply_activation_checkpointing",
    "apply_attention",
    "apply_liger",
    "estimate_memory",
    "plan_batch",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_memopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> "list[str]":
    return sorted({*globals(), *_EXPORTS})


_registration.register_when_lightning_loads()
