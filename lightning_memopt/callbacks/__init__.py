"""Lightning callbacks: the transforms for any strategy."""

from lightning_memopt.callbacks.transforms import ActivationCheckpointing, FlashAttention, LigerKernel

__all__ = ["ActivationCheckpointing", "FlashAttention", "LigerKernel"]
