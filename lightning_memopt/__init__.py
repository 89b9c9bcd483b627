"""lightning_memopt: make large models fit in Lightning, and know where the memory goes."""

from lightning_memopt.callbacks import ActivationCheckpointing, BatchPlanner, FlashAttention, LigerKernel, MemoryMonitor
from lightning_memopt.planning import estimate_memory
from lightning_memopt.predictor import MemoryEstimate
from lightning_memopt.strategies import MemOptStrategy
from lightning_memopt.transforms import apply_activation_checkpointing, apply_attention, apply_liger

__version__ = "0.1.0"

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
]
