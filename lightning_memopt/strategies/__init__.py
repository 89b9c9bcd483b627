"""Alias of :mod:`lightning_memopt.lightning.strategies`, kept as a public import path
(``from lightning_memopt.strategies import MemOptStrategy``)."""

from lightning_memopt.lightning.strategies import MemOptStrategy

__all__ = ["MemOptStrategy"]
