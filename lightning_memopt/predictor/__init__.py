"""The memory predictor: per-rank bytes of a training step, before the run.

Example:
    >>> from lightning_memopt.predictor import estimate_memory
    >>> est = estimate_memory("llama-3-8b", engine="torch", precision="bf16-mixed", seq_len=2048)
    >>> est.optimizer_states / 1e9
    64.242089984
"""

from lightning_memopt.predictor.api import estimate_memory
from lightning_memopt.predictor.estimate import MemoryEstimate
from lightning_memopt.predictor.precision import resolve_precision
from lightning_memopt.predictor.presets import PRESETS
from lightning_memopt.predictor.reading import ModelReading, read_model
from lightning_memopt.predictor.sources import resolve_model

__all__ = ["MemoryEstimate", "ModelReading", "PRESETS", "estimate_memory", "read_model", "resolve_model",
           "resolve_precision"]
