"""An exact live-tensor tracker: every storage that an aten op returns, de-duplicated, until it dies.

A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees the outputs of every aten op run while
it is active (forward, backward on CPU, which runs in the calling thread, optimizer steps, DeepSpeed's
flattening and partitioning, which are torch ops too). Each output's storage is counted once, by its
``StorageImpl``, with its byte size; a ``weakref.finalize`` on the storage removes it when the last
tensor using it dies. Views, ``.data`` aliases and in-place ops therefore never double count, and a
storage that changes size (``resize_``, ``set_``) is re-measured when an op returns it.

What it does not see: memory a kernel allocates and frees inside one op (workspaces), storages resized
without an op (``UntypedStorage.resize_``; :meth:`TensorMemoryTracker.sync` re-measures those), and
ops run in threads where the mode is not active. Storages that existed before the tracker was entered
count once registered with :meth:`TensorMemoryTracker.track`.
"""

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_memopt.measuring.tensor_walk import iter_tensors


class TensorMemoryTracker(TorchDispatchMode):
    """Current and peak bytes of the live tensor storages on one device.

    Use as a context manager around the code to measure; it can be entered again later and keeps its
    count in between (allocations made while it is not entered are not seen).

    Args:
        device: the device whose storages are counted (``"cpu"`` by default).

    Example:
        >>> tracker = TensorMemoryTracker("cpu")
        >>> with tracker:
        ...     x = torch.zeros(1000, dtype=torch.uint8)
        ...     y = x.view(10, 100)  # a view: same storage
        ...     z = x + 1            # a new 1000-byte storage
        ...     del z
        >>> tracker.current_bytes, tracker.peak_bytes
        (1000, 2000)
        >>> del x, y
        >>> tracker.current_bytes
        0
    """

    def __init__(self, device: "torch.device | str" = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self._live: dict[int, tuple[weakref.finalize, int]] = {}
        self._current = 0
        self._peak = 0

    @property
    def current_bytes(self) -> int:
        """Bytes of the tracked storages alive now."""
        return self._current

    @property
    def peak_bytes(self) -> int:
        """Highest :attr:`current_bytes` since the last :meth:`reset_peak` (or creation)."""
        return self._peak

    @property
    def num_storages(self) -> int:
        """Number of tracked storages alive now."""
        return len(self._live)

    def reset_peak(self) -> None:
        """Set the peak to the current bytes."""
        self._peak = self._current

    def track(self, *objects: object) -> int:
        """Count the storages of tensors created before the tracker (or outside it) until they die.

        Args:
            objects: tensors, modules, optimizers, or any object holding tensors (see
                :func:`~lightning_memopt.measuring.tensor_walk.iter_tensors`).

        Returns:
            The bytes newly added (storages already tracked are skipped).
        """
        before = self._current
        for tensor in iter_tensors(objects):
            self._see(tensor)
        return self._current - before

    def sync(self) -> None:
        """Re-measure every tracked storage (catches ``UntypedStorage.resize_`` done without an op)."""
        for key, (finalizer, nbytes) in list(self._live.items()):
            alive = finalizer.peek()
            if alive is not None:
                self._resize(key, finalizer, nbytes, alive[0].nbytes())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self._see(out)
        elif isinstance(out, (tuple, list)):
            for item in out:
                if isinstance(item, torch.Tensor):
                    self._see(item)
                elif isinstance(item, (tuple, list)):
                    for inner in item:
                        if isinstance(inner, torch.Tensor):
                            self._see(inner)
        return out

    def _see(self, tensor: torch.Tensor) -> None:
        if tensor.device != self.device or tensor.layout != torch.strided:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a real storage
            return
        key = storage._cdata
        nbytes = storage.nbytes()
        entry = self._live.get(key)
        if entry is not None:
            if entry[1] != nbytes:
                self._resize(key, entry[0], entry[1], nbytes)
            return
        finalizer = weakref.finalize(storage, self._release, key)
        finalizer.atexit = False
        self._live[key] = (finalizer, nbytes)
        self._add(nbytes)

    def _resize(self, key: int, finalizer: weakref.finalize, old: int, new: int) -> None:
        self._live[key] = (finalizer, new)
        self._add(new - old)

    def _release(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self._current -= entry[1]

    def _add(self, nbytes: int) -> None:
        self._current += nbytes
        if self._current > self._peak:
            self._peak = self._current
