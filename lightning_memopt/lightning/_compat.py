"""Every private Lightning API the Lightning glue uses, in one place (written and tested against Lightning 2.6.6).

Each helper names the private attribute it reads and guards it by feature rather than by version number: when a
Lightning version no longer has it, the helper degrades to the public path (the fit loop builds the loader again,
the Trainer calls the hook again) instead of failing.
"""

import itertools
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn


def train_source_defined(trainer: "pl.Trainer") -> bool:
    """Whether the fit has training data (``fit_loop._data_source``, private)."""
    source = getattr(trainer.fit_loop, "_data_source", None)
    return source is not None and source.is_defined()


def request_train_loader(trainer: "pl.Trainer") -> Any:
    """The training loader as the user's hook returns it, unprocessed (a new build: used outside ``fit`` only, as
    Lightning's own ``DeepSpeedStrategy._auto_select_batch_size`` does)."""
    return trainer.fit_loop._data_source.dataloader()


def fit_train_loader(trainer: "pl.Trainer") -> Any:
    """Lightning's training loader of this fit, built now if it is not yet: ``fit_loop.setup_data()`` is the call
    the fit loop makes before the first step (and ``Trainer.estimated_stepping_batches`` makes early); once built, the
    fit loop keeps it (``setup_data`` returns at once). ``None`` when the fit has no training data."""
    if trainer.state.fn != TrainerFn.FITTING:
        return None
    if getattr(trainer.fit_loop, "_combined_loader", None) is None:
        trainer.fit_loop.setup_data()
    return trainer.train_dataloader


def drop_train_loader(trainer: "pl.Trainer") -> None:
    """Forget the training loader built for this fit, so that the fit loop builds it again (after a change of the
    batch size, or to let Lightning restore a stateful loader on resume). Private: ``fit_loop._data_fetcher`` and
    ``fit_loop._combined_loader``, which ``setup_data`` checks."""
    fit_loop = trainer.fit_loop
    fetcher = getattr(fit_loop, "_data_fetcher", None)
    if fetcher is not None:
        fetcher.teardown()  # ends the iterator (and its workers) started in setup_data
        fit_loop._data_fetcher = None
    fit_loop._combined_loader = None


def loader_is_stateful(trainer: "pl.Trainer") -> bool:
    """Whether a training loader of the fit saves its position (``state_dict``/``load_state_dict``), which Lightning
    restores on resume inside ``setup_data`` (private: ``fit_loop._combined_loader``)."""
    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    loaders = combined.flattened if combined is not None else []
    return any(callable(getattr(dl, "state_dict", None)) and callable(getattr(dl, "load_state_dict", None))
               for dl in loaders)  # fmt: skip


def peek_first_batch(trainer: "pl.Trainer") -> "tuple[bool, Any]":
    """The next batch of the iterator the fit loop trains with, left in place for the fit loop (the loader's workers
    start once): ``(True, batch)``, ``(True, None)`` for an empty loader, or ``(False, None)`` when this Lightning's
    fetcher is not the one known here.

    Private: the fit loop's data fetcher (``fit_loop._data_fetcher``) holds its prefetched items in ``batches`` and
    the loader's iterator in ``iterator``; an item is ``(batch, batch_idx, dataloader_idx)``. A batch taken from
    ``iterator`` is chained back in front of it, as a prefetched batch would be.
    """
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if fetcher is None or getattr(fetcher, "iterator", None) is None:
        return False, None
    prefetched = getattr(fetcher, "batches", None)
    if prefetched:
        item = prefetched[0]
    else:
        try:
            item = next(fetcher.iterator)
        except StopIteration:
            return True, None
        fetcher.iterator = itertools.chain([item], fetcher.iterator)
    if not (isinstance(item, tuple) and len(item) == 3):  # another Lightning: the caller builds the loader again
        return False, None
    return True, item[0]


def call_configure_optimizers(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Any:
    """``configure_optimizers()`` called as the Trainer calls it (``trainer.call._call_lightning_module_hook``,
    private: it sets the hook name that ``self.log`` checks and profiles the call); a plain call without it."""
    from lightning.pytorch.trainer import call

    hook = getattr(call, "_call_lightning_module_hook", None)
    if hook is None:
        return pl_module.configure_optimizers()
    return hook(trainer, "configure_optimizers", pl_module=pl_module)


def parse_optimizers(optim_conf: Any) -> list:
    """The optimizers in a ``configure_optimizers`` result, read and checked by Lightning itself
    (``lightning.pytorch.core.optimizer._configure_optimizers``, private); empty (unknown) without it."""
    from lightning.pytorch.core import optimizer

    parse = getattr(optimizer, "_configure_optimizers", None)
    return [] if parse is None else list(parse(optim_conf)[0])


def init_optimizers_and_lr_schedulers(pl_module: "pl.LightningModule") -> "tuple[list, list]":
    """The optimizers and LR scheduler configs of the module, as every Lightning strategy builds them
    (``lightning.pytorch.core.optimizer._init_optimizers_and_lr_schedulers``, private)."""
    from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers

    return _init_optimizers_and_lr_schedulers(pl_module)


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, before its teardown.

    Lightning's ``_init_dist_connection`` registers ``_destroy_dist_connection`` (private) at exit for NCCL groups
    only, and DeepSpeed's ``init_distributed``, which DeepSpeed strategies call instead, registers nothing. A gloo
    group left to the interpreter's teardown can abort a finished run ("terminate called without an active
    exception": gloo's threads still hold work whose tensors need the interpreter, pytorch#190489). Registering the
    same handler again replaces it, so a process that fits several times runs it once.
    """
    import atexit

    from lightning.fabric.utilities import distributed

    handler = getattr(distributed, "_destroy_dist_connection", None) or _destroy_default_group
    atexit.unregister(handler)
    atexit.register(handler)


def _destroy_default_group() -> None:
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
