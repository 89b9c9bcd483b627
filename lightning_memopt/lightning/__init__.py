"""The Lightning layer: the only part of the package that imports Lightning.

* :mod:`.strategies`: :class:`~lightning_memopt.lightning.strategies.MemOptStrategy` (DeepSpeed ZeRO 0-3 with the
  transforms) and its registered names;
* :mod:`.callbacks`: the transforms as callbacks for any strategy, ``MemoryMonitor`` and ``BatchPlanner``;
* :mod:`._run_reader`: what a fit is (batch shape, optimizer, strategy settings), read once per fit and shared by
  the strategy and every callback; :mod:`._compat`: every private Lightning API used, in one place;
* :mod:`.consolidate`: a sharded DeepSpeed checkpoint as one fp32 state dict.

This package's ``__init__`` imports nothing, so that :mod:`._registration` can be loaded by a bare
``import lightning_memopt`` without loading Lightning.
"""
