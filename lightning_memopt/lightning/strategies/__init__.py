"""Lightning strategies: :class:`MemOptStrategy` and its registered names (``Trainer(strategy="memopt_zero3")``)."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_memopt.lightning.strategies.memopt import MemOptStrategy

MemOptStrategy.register_strategies(StrategyRegistry)

__all__ = ["MemOptStrategy"]
