"""Alias of the public helpers that lived here before the package was split into layers: measuring
(:mod:`lightning_memopt.measuring`), units (:mod:`lightning_memopt.core.units`) and checkpoint consolidation
(:mod:`lightning_memopt.lightning.consolidate`). Names resolve on first use (PEP 562)."""

import importlib
from typing import Any

#: public name -> the module that defines it now
_MOVED = {
    "DeviceMemoryProbe": "lightning_memopt.measuring.memory",
    "consolidate_checkpoint": "lightning_memopt.lightning.consolidate",
    "format_bytes": "lightning_memopt.core.units",
    "model_state_bytes": "lightning_memopt.measuring.zero_state",
    "parse_bytes": "lightning_memopt.core.units",
}
__all__ = sorted(_MOVED)


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'lightning_memopt.utilities' has no attribute {name!r}")
    return getattr(importlib.import_module(_MOVED[name]), name)
