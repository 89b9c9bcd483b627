"""Register ``memopt_*`` strategy names with Lightning on first use, without importing Lightning before it is used.

Lightning resolves ``Trainer(strategy="memopt_zero3")`` against its ``StrategyRegistry``, which holds what was
registered when the Trainer is built; Lightning has no entry point for third-party strategies. So: if
``lightning.pytorch`` is already imported, the names are registered now; otherwise a one-shot import hook
registers them as soon as ``lightning.pytorch`` has finished importing (``import lightning`` and
``import lightning.pytorch`` both get there) and then removes itself. A process that never imports Lightning (the
command line) never loads it.
"""

import importlib.abc
import importlib.util
import sys
from typing import Any

_TARGET = "lightning.pytorch"


def register() -> None:
    """Register the strategy names in Lightning's ``StrategyRegistry`` (imports the strategy)."""
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_memopt.lightning.strategies.memopt import MemOptStrategy

    MemOptStrategy.register_strategies(StrategyRegistry)


class _RegisterAfterLightning(importlib.abc.MetaPathFinder):
    """Finds ``lightning.pytorch`` through the other finders and registers the strategies once it has run."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot: the real finders take over
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            register()

        loader.exec_module = exec_module  # this spec's loader only
        return spec


def register_when_lightning_loads() -> None:
    """Register now if Lightning is loaded, else when it is (see the module docstring)."""
    if _TARGET in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterLightning) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterLightning())
