"""The memory predictor: per-rank bytes of a training step of a model as it is, before the run.

A pipeline of four stages, one package each, run by :func:`~lightning_memopt.predictor.api.predict`:

==========  ==================================================  ============================================
stage       what it does                                        hands on
==========  ==================================================  ============================================
``read``    the model argument read once                        ``Source`` (``ModelReading`` + the module)
``trace``   one training step traced on fake tensors            ``Timeline`` (live bytes after every op)
``account`` the engine (torch, ZeRO 0-3, offload) and device    ``Accounting`` (the peak moment, per rank)
``report``  the estimate                                        ``MemoryEstimate``
==========  ==================================================  ============================================

The arguments are validated once into a ``Request`` (:mod:`.request`, with :mod:`.precision` and :mod:`.device`),
which every stage reads. The names below load on first use (PEP 562), so that the presets and the estimate type are
read without torch.

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
    "MemoryEstimate": "lightning_memopt.predictor.report.estimate",
    "ModelReading": "lightning_memopt.predictor.read.reading",
    "PRESETS": "lightning_memopt.predictor.read.presets",
    "predict": "lightning_memopt.predictor.api",
    "read_model": "lightning_memopt.predictor.read.reading",
    "resolve_model": "lightning_memopt.predictor.read.sources",
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
