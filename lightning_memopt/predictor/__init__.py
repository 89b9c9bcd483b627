"""The memory predictor: per-rank bytes of a training step of a model as it is, before the run.

The names below load on first use (PEP 562), so that the presets and the estimate type are read without torch.

Example:
    >>> from lightning_memopt.predictor import predict
    >>> est = predict("llama-3-8b", engine="torch", precision="bf16-mixed", seq_len=2048)
    >>> est.optimizer_states / 1e9
    64.242089984
"""

import importlib
from typing import Any

#: public name -> the module that defines it
_EXPORTS = {
    "MemoryEstimate": "lightning_memopt.predictor.estimate",
    "ModelReading": "lightning_memopt.predictor.reading",
    "PRESETS": "lightning_memopt.predictor.presets",
    "predict": "lightning_memopt.predictor.api",
    "read_model": "lightning_memopt.predictor.reading",
    "resolve_model": "lightning_memopt.predictor.sources",
    "resolve_precision": "lightning_memopt.predictor.precision",
}
__all__ = ["PRESETS", "MemoryEstimate", "ModelReading", "predict", "read_model", "resolve_model", "resolve_precision"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_memopt.predictor' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> "list[str]":
    return sorted({*globals(), *_EXPORTS})
