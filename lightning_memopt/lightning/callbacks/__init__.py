"""Lightning callbacks: the transforms for any strategy, the memory monitor and the batch planner."""

from lightning_memopt.lightning.callbacks.batch_planner import BatchPlanner
from lightning_memopt.lightning.callbacks.memory_monitor import MemoryDoesNotFitError, MemoryMonitor
from lightning_memopt.lightning.callbacks.transforms import ActivationCheckpointing, FlashAttention, LigerKernel

__all__ = [
    "ActivationCheckpointing", "BatchPlanner", "FlashAttention", "LigerKernel", "MemoryDoesNotFitError",
    "MemoryMonitor",
]  # fmt: skip
