"""A counting CPU allocator: live and peak bytes of every CPU tensor storage, at almost no cost.

PyTorch keeps no allocation statistics for CPU memory (``torch.cuda.max_memory_allocated`` has no CPU
twin in torch 2.13). This module compiles, once, a 60-line C++ allocator with
:func:`torch.utils.cpp_extension.load_inline` (the system C++ compiler and ninja, against torch's own headers;
cached in torch's extension directory, ``$TORCH_EXTENSIONS_DIR``). It wraps the current CPU allocator through
``c10::SetCPUAllocator`` and counts the bytes it hands out and takes back (atomics; a ``ptr -> size`` table under a
mutex). While installed, every CPU storage allocated is counted, in every thread, whatever created it (an aten op, a
kernel's own workspace, DeepSpeed's flat buffers, ``torch.empty`` in Python). Storages allocated *before*
installation are not seen by the allocator; :meth:`CPUAllocationCounter.track` adds them (de-duplicated by storage)
and removes them again when they are freed.

It is process-wide while installed, so it is installed for one fit (``MemoryMonitor``'s default
``cpu_mode="allocator"``, from ``setup`` to the end of the fit, also when the fit fails) and
:meth:`CPUAllocationCounter.close` puts the previous allocator back. What torch allows: the previous allocator is
restored with ``c10::SetCPUAllocator`` at the same priority, so new storages are no longer counted; the storages
allocated meanwhile keep this library's deleter, so the library stays loaded for the life of the process (it is
never unloaded) and still takes them off the count when they are freed.
"""

import ctypes
import subprocess
import threading
import weakref

from lightning_memopt.measuring.tensor_walk import iter_tensors

_SOURCE = r"""
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_map>

namespace {
std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};
std::atomic<int64_t> g_count{0};
std::mutex g_mutex;
std::unordered_map<void*, std::pair<size_t, c10::DeleterFnPtr>> g_table;

void bump(int64_t delta) {
  int64_t cur = g_current.fetch_add(delta, std::memory_order_relaxed) + delta;
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (cur > peak && !g_peak.compare_exchange_weak(peak, cur, std::memory_order_relaxed)) {
  }
}

void counting_delete(void* ctx) {
  size_t nbytes = 0;
  c10::DeleterFnPtr inner = nullptr;
  {
    std::lock_guard<std::mutex> guard(g_mutex);
    auto it = g_table.find(ctx);
    if (it != g_table.end()) {
      nbytes = it->second.first;
      inner = it->second.second;
      g_table.erase(it);
    }
  }
  bump(-static_cast<int64_t>(nbytes));
  if (inner != nullptr) inner(ctx);
}

struct CountingAllocator final : c10::Allocator {
  c10::Allocator* inner = nullptr;
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr d = inner->allocate(n);
    void* ptr = d.get();
    // Only simple pointers (context == data, as the default CPU allocator returns) are wrapped.
    if (n == 0 || ptr == nullptr || ptr != d.get_context()) return d;
    c10::DeleterFnPtr del = d.get_deleter();
    c10::Device device = d.device();
    d.release_context();
    {
      std::lock_guard<std::mutex> guard(g_mutex);
      g_table[ptr] = {n, del};
    }
    g_count.fetch_add(1, std::memory_order_relaxed);
    bump(static_cast<int64_t>(n));
    return {ptr, ptr, &counting_delete, device};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &counting_delete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};
CountingAllocator g_allocator;
}  // namespace

extern "C" {
int lmo_install() {
  if (c10::GetCPUAllocator() == &g_allocator) return 0;
  g_allocator.inner = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&g_allocator, 255);
  return c10::GetCPUAllocator() == &g_allocator ? 1 : -1;
}
int lmo_uninstall() {
  if (c10::GetCPUAllocator() != &g_allocator) return 0;
  c10::SetCPUAllocator(g_allocator.inner, 255);
  return 1;
}
int lmo_installed() { return c10::GetCPUAllocator() == &g_allocator ? 1 : 0; }
int64_t lmo_current() { return g_current.load(); }
int64_t lmo_peak() { return g_peak.load(); }
int64_t lmo_count() { return g_count.load(); }
void lmo_reset_peak() { g_peak.store(g_current.load()); }
void lmo_add(int64_t delta) { bump(delta); }
int lmo_owns(void* ptr) {
  std::lock_guard<std::mutex> guard(g_mutex);
  return g_table.count(ptr) ? 1 : 0;
}
}
"""

_LIB: ctypes.CDLL | None = None
_LOCK = threading.Lock()


def _build_library() -> str:
    """Compile the counting allocator against the installed torch (once: ``load_inline`` caches the build by source
    and torch version) and return the shared library's path."""
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError(
            "Expected ninja to build the CPU counting allocator (torch.utils.cpp_extension.load_inline needs it),"
            " found none. Fix: `pip install ninja`, or measure CPU memory with the dispatch tracker"
            " (MemoryMonitor(cpu_mode='dispatch')), which needs no compiler."
        )
    try:
        return cpp_extension.load_inline(
            "lightning_memopt_cpu_counting_allocator", [_SOURCE], extra_cflags=["-O2"],
            is_python_module=False, no_implicit_headers=True,
        )  # fmt: skip
    except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
        raise RuntimeError(
            f"Building the CPU counting allocator failed ({type(err).__name__}: {err}). Fix: install a C++ compiler"
            " (e.g. `apt-get install g++`), or measure CPU memory with the dispatch tracker"
            " (MemoryMonitor(cpu_mode='dispatch'))."
        ) from err


def _library() -> ctypes.CDLL:
    global _LIB
    with _LOCK:
        if _LIB is None:
            lib = ctypes.CDLL(_build_library())
            for name in ("lmo_current", "lmo_peak", "lmo_count"):
                getattr(lib, name).restype = ctypes.c_int64
            lib.lmo_add.argtypes = [ctypes.c_int64]
            lib.lmo_owns.argtypes = [ctypes.c_void_p]
            _LIB = lib
        return _LIB


class CPUAllocationCounter:
    """Live and peak bytes of CPU tensor storages, counted by a process-wide counting allocator.

    Creating one installs the allocator (unless it is installed already); :meth:`close` restores the previous one
    if this counter installed it. Several counters share one count. Storages allocated before installation count
    only once registered with :meth:`track`. The count includes everything the CPU allocator hands out: also the
    workspaces that kernels allocate and free inside one op, which a dispatch-level tracker does not see.

    Raises:
        RuntimeError: no C++ compiler or ninja to build it, or another allocator with a higher priority is set.

    Example:
        >>> import torch
        >>> counter = CPUAllocationCounter()
        >>> counter.reset_peak()
        >>> before = counter.current_bytes
        >>> x = torch.empty(1000, dtype=torch.uint8)
        >>> counter.current_bytes - before
        1000
        >>> del x
        >>> counter.current_bytes - before, counter.peak_bytes - before
        (0, 1000)
        >>> counter.close()
        >>> CPUAllocationCounter.installed()
        False
    """

    def __init__(self) -> None:
        self._lib = _library()
        status = self._lib.lmo_install()
        if status < 0:
            raise RuntimeError("Could not install the CPU counting allocator (a higher-priority one is set).")
        self._installed_here = status == 1
        self._tracked: dict[int, weakref.finalize] = {}

    def close(self) -> None:
        """Restore the CPU allocator that was in place, if this counter installed the counting one (storages
        already counted are still taken off the count when freed)."""
        if self._installed_here:
            self._lib.lmo_uninstall()
            self._installed_here = False

    @staticmethod
    def installed() -> bool:
        """Whether the counting allocator is the current CPU allocator."""
        return _LIB is not None and bool(_LIB.lmo_installed())

    @property
    def current_bytes(self) -> int:
        """Bytes of CPU storages alive now (counted ones plus tracked ones)."""
        return int(self._lib.lmo_current())

    @property
    def peak_bytes(self) -> int:
        """Highest :attr:`current_bytes` since the last :meth:`reset_peak` (or installation)."""
        return int(self._lib.lmo_peak())

    @property
    def num_allocations(self) -> int:
        """Number of allocations counted since installation."""
        return int(self._lib.lmo_count())

    def reset_peak(self) -> None:
        """Set the peak to the current bytes."""
        self._lib.lmo_reset_peak()

    def track(self, *objects: object) -> int:
        """Count the CPU storages of tensors allocated before installation until they are freed.

        Args:
            objects: tensors, modules (parameters, buffers, gradients), optimizers (states), or any object
                holding tensors in attributes, lists or dicts (e.g. a DeepSpeed engine's flat buffers).

        Returns:
            The bytes newly added to the count (storages already counted are skipped).
        """
        added = 0
        for tensor in iter_tensors(objects):
            if tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            nbytes = storage.nbytes()
            if key in self._tracked or nbytes == 0 or self._lib.lmo_owns(storage.data_ptr()):
                continue
            self._lib.lmo_add(nbytes)
            finalizer = weakref.finalize(storage, self._release, key, nbytes)
            finalizer.atexit = False
            self._tracked[key] = finalizer
            added += nbytes
        return added

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.pop(key, None)
        self._lib.lmo_add(-nbytes)

