"""The device a run trains on, as the predictor needs it: a CUDA device's rules (its cuBLAS workspaces, its allocator's
mode, its context), named once and read by every stage (:class:`CudaRules`; ``None`` for the CPU).

* **cuBLAS workspaces.** Every cuBLAS handle gets a workspace from the caching allocator on its first matmul and
  keeps it (``aten/src/ATen/cuda/CublasHandlePool.cpp``, ``getChosenWorkspaceSize``: 4096 KiB x 8 = 32 MiB on
  compute capability 9.x, 4096 KiB x 2 + 16 KiB x 8 elsewhere; ``CUBLAS_WORKSPACE_CONFIG=:SIZE_KIB:COUNT[...]``
  overrides it; with ``TORCH_CUBLASLT_UNIFIED_WORKSPACE``, on by default, cuBLASLt shares it). Handles are kept per
  thread: the forward runs on the Python thread and the backward on autograd's device thread, so a training step
  holds two (measured on an H200 with torch 2.11: 64.0 MiB in all eight configurations run with expandable segments,
  ``benchmarks/gpu_accuracy.py``).
* **The caching allocator's mode**: native or ``expandable_segments:True`` (``PYTORCH_CUDA_ALLOC_CONF``, or what a
  strategy set at run time).
* **The CUDA context** (driver state, loaded kernels and the libraries' handles), which ``mem_get_info`` shows and the
  allocator does not: a table measured per device kind (:data:`CONTEXT_BYTES`); a kind not measured has none, and the
  device total is then not predicted.
"""

import os
from dataclasses import dataclass

from lightning_memopt.core import compat

#: cuBLAS workspace per handle by compute-capability major (``getChosenWorkspaceSize``'s defaults)
WORKSPACE_BYTES = {9: 4096 * 1024 * 8, 10: 4096 * 1024 * 8}
#: elsewhere: ``:4096:2:16:8``
DEFAULT_WORKSPACE_BYTES = 4096 * 1024 * 2 + 16 * 1024 * 8
#: the threads that run matmuls in a training step: the Python thread (forward) and autograd's device thread
BLAS_THREADS = 2
#: named GPUs -> (compute capability, memory in bytes, streaming multiprocessors, threads per multiprocessor), as
#: ``cudaGetDeviceProperties`` reports them (``multiProcessorCount``, ``maxThreadsPerMultiProcessor``; the H100 is the
#: SXM part)
DEVICES = {
    "h100": ((9, 0), 80 * 2**30, 132, 2048),
    "h200": ((9, 0), 141 * 10**9, 132, 2048),
    "a100": ((8, 0), 80 * 2**30, 108, 2048),
    "l40s": ((8, 9), 48 * 2**30, 142, 1536),
    "l4": ((8, 9), 24 * 2**30, 58, 1536),
}
#: the CUDA context by device kind: ``mem_get_info``'s used bytes minus ``memory_reserved`` after a training step,
#: measured (device name as torch reports it, lower case -> bytes). H200: torch 2.11 + CUDA 13.0, driver's lazy
#: module loading, cuBLAS and cuDNN loaded (``benchmarks/gpu_accuracy.py``, 2026-12-04).
CONTEXT_BYTES = {"nvidia h200": 804_061_184}


@dataclass(frozen=True)
class KernelDevice:
    """What CUDA's kernels size their launches, and with them their own temporaries, by (``cudaDeviceProp``).

    Attributes:
        multiprocessors: ``multiProcessorCount``.
        threads_per_multiprocessor: ``maxThreadsPerMultiProcessor``.

    The defaults are the H100 SXM's (the GPU a plain ``"cuda"`` target stands for).
    """

    multiprocessors: int = 132
    threads_per_multiprocessor: int = 2048


@dataclass(frozen=True)
class CudaRules:
    """What a CUDA device adds to a traced step (see the module docstring).

    Attributes:
        name: the device kind (``"nvidia h200"``, ``"h100"``, or ``"cuda"`` for one not named).
        capability: the compute capability.
        workspace_bytes: one cuBLAS handle's workspace.
        context_bytes: the CUDA context (``None``: not measured for this kind).
        expandable_segments: the allocator runs with ``expandable_segments:True``.
        kernels: what the device's kernels size their temporaries by.

    Example:
        >>> rules = cuda_rules("h100")
        >>> rules.workspace_bytes * BLAS_THREADS // 2**20, rules.expandable_segments
        (64, False)
    """

    name: str
    capability: "tuple[int, int]"
    workspace_bytes: int
    context_bytes: "int | None" = None
    expandable_segments: bool = False
    kernels: KernelDevice = KernelDevice()

    @property
    def workspaces(self) -> int:
        """The workspaces a training step holds (one per thread that runs matmuls)."""
        return BLAS_THREADS * self.workspace_bytes


def workspace_bytes(capability: "tuple[int, int]", env: "dict[str, str] | None" = None) -> int:
    """One cuBLAS handle's workspace: ``CUBLAS_WORKSPACE_CONFIG`` when set, else torch's default for the device.

    Example:
        >>> workspace_bytes((9, 0)) // 2**20, workspace_bytes((8, 0))
        (32, 8519680)
        >>> workspace_bytes((9, 0), {"CUBLAS_WORKSPACE_CONFIG": ":4096:8:16:8"})
        33685504
    """
    config = (os.environ if env is None else env).get("CUBLAS_WORKSPACE_CONFIG")
    if config:
        parts = [p for p in config.split(":") if p]
        try:
            return sum(int(size) * 1024 * int(count) for size, count in zip(parts[::2], parts[1::2]))
        except ValueError:
            raise ValueError(
                f"Expected CUBLAS_WORKSPACE_CONFIG like ':4096:8', got {config!r}. Fix: set it as cuBLAS documents"
                " (':SIZE_KIB:COUNT' pairs) or unset it."
            ) from None
    return WORKSPACE_BYTES.get(capability[0], DEFAULT_WORKSPACE_BYTES)


def expandable_from_env(env: "dict[str, str] | None" = None) -> bool:
    """Whether the CUDA caching allocator's settings turn on expandable segments: ``PYTORCH_CUDA_ALLOC_CONF`` (or
    ``PYTORCH_ALLOC_CONF``) of ``env``; ``None``: the settings torch holds now (the variable as read at start-up, or
    what a strategy set since, e.g. :class:`~lightning_memopt.lightning.strategies.memopt.MemOptStrategy`).

    Example:
        >>> expandable_from_env({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128,expandable_segments:True"})
        True
    """
    conf = None if env is None else (compat.allocator_variable(env) or ("", ""))[1]
    return compat.allocator_options(conf).get("expandable_segments") == "true"


def cuda_rules(
    device: "str | None",
    *,
    capability: "tuple[int, int] | None" = None,
    expandable_segments: "bool | None" = None,
    kernels: "KernelDevice | None" = None,
) -> "CudaRules | None":
    """The rules of a target device: ``None`` or ``"cpu"`` (none), ``"cuda"`` (the process's GPU when its
    capability is given, else a compute-capability 9.0 GPU such as the H100/H200), a named GPU
    (:data:`DEVICES`) or a device name as torch reports it (``"NVIDIA H200"``).

    Args:
        device: the target.
        capability: the compute capability (read from the live device by the caller that has one).
        expandable_segments: the allocator's mode; ``None``: as ``PYTORCH_CUDA_ALLOC_CONF`` says.
        kernels: the multiprocessors (read from the live device by the caller that has one); else the named GPU's,
            else an H100's.

    Raises:
        ValueError: a device that is neither the CPU, CUDA nor a known GPU, with the fix.

    Example:
        >>> cuda_rules("cpu") is None, cuda_rules("NVIDIA H200").context_bytes > 0, cuda_rules("a100").context_bytes
        (True, True, None)
        >>> cuda_rules("a100").kernels.multiprocessors, cuda_rules("cuda").kernels.multiprocessors
        (108, 132)
    """
    if device is None or str(device).lower() in ("cpu", "meta"):
        return None
    name = str(device).lower()
    known = DEVICES.get(name) or next((v for k, v in DEVICES.items() if k in name.split()), None)
    if name.startswith("cuda"):
        name, cap = "cuda", capability or (9, 0)
    elif name.startswith("nvidia") or known is not None:
        cap = capability or (known[0] if known else (9, 0))
    else:
        raise ValueError(
            f"Expected `device` 'cpu', 'cuda' or a GPU in {sorted(DEVICES)}, got {device!r}."
            " Fix: e.g. device='h100' (or 'cuda': a compute-capability 9.0 GPU)."
        )
    context = CONTEXT_BYTES.get(name) or next((v for k, v in CONTEXT_BYTES.items() if name in k.split()), None)
    expandable = expandable_from_env() if expandable_segments is None else bool(expandable_segments)
    if kernels is None:
        kernels = KernelDevice(*known[2:]) if known is not None and name != "cuda" else KernelDevice()
    return CudaRules(name, cap, workspace_bytes(cap), context, expandable, kernels)
