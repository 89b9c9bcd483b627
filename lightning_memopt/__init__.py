"""lightning_memopt: make large models fit in Lightning, and know where the memory goes."""

from lightning_memopt.predictor.estimate import MemoryEstimate
from lightning_memopt.strategies import MemOptStrategy

__version__ = "0.1.0"

__all__ = ["MemOptStrategy", "MemoryEstimate"]
