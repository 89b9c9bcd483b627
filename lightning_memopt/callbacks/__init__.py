"""Alias of :mod:`lightning_memopt.lightning.callbacks`, kept as a public import path
(``from lightning_memopt.callbacks import MemoryMonitor``)."""

from lightning_memopt.lightning.callbacks import (
    ActivationCheckpointing,
    BatchPlanner,
    FlashAttention,
    LigerKernel,
    MemoryDoesNotFitError,
    MemoryMonitor,
)

__all__ = [
    "ActivationCheckpointing", "BatchPlanner", "FlashAttention", "LigerKernel", "MemoryDoesNotFitError",
    "MemoryMonitor",
]  # fmt: skip
