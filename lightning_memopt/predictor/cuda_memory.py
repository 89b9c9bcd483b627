"""CUDA's rules, applied to a traced step: what the GPU allocates, reserves and uses beyond the live tensors.

A traced step counts live tensor bytes, exactly as the step holds them. On a CUDA device three things come on top,
and each is data here, applied after the trace (no branch in the trace itself):

* **cuBLAS workspaces.** Every cuBLAS handle gets a workspace from the caching allocator on its first matmul and
  keeps it (``aten/src/ATen/cuda/CublasHandlePool.cpp``, ``getChosenWorkspaceSize``: 4096 KiB x 8 = 32 MiB on
  compute capability 9.x, 4096 KiB x 2 + 16 KiB x 8 elsewhere; ``CUBLAS_WORKSPACE_CONFIG=:SIZE_KIB:COUNT[...]``
  overrides it; with ``TORCH_CUBLASLT_UNIFIED_WORKSPACE``, on by default, cuBLASLt shares it). Handles are kept per
  thread: the forward runs on the Python thread and the backward on autograd's device thread, so a training step
  holds two (measured on an H200 with torch 2.11: 64.0 MiB in all eight configurations run with expandable segments,
  ``benchmarks/gpu_accuracy.py``).
* **The caching allocator.** ``max_memory_allocated`` counts whole blocks (a request is rounded up to 512 bytes, and
  a large block is handed out unsplit when less than 1 MiB would remain), and ``max_memory_reserved`` counts the
  segments behind them. :func:`replay_run` turns a recorded trace into the whole run's allocation sequence (the
  parameters, two training steps in Lightning's order, the optimizer's states and temporaries) and replays it through
  :mod:`.cuda_allocator`, natively or with ``expandable_segments:True``.
* **The CUDA context** (driver state, loaded kernels and the libraries' handles), which ``mem_get_info`` shows and the
  allocator does not: a table measured per device kind (:data:`CONTEXT_BYTES`); a kind not measured has none, and the
  device total is then not predicted.
"""

import contextlib
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lightning_memopt.core import compat
from lightning_memopt.predictor.cuda_allocator import AllocatorResult, AllocatorSettings, simulate

#: cuBLAS workspace per handle by compute-capability major (``getChosenWorkspaceSize``'s defaults)
WORKSPACE_BYTES = {9: 4096 * 1024 * 8, 10: 4096 * 1024 * 8}
#: elsewhere: ``:4096:2:16:8``
DEFAULT_WORKSPACE_BYTES = 4096 * 1024 * 2 + 16 * 1024 * 8
#: the threads that run matmuls in a training step: the Python thread (forward) and autograd's device thread
BLAS_THREADS = 2
#: named GPUs -> (compute capability, memory in bytes)
DEVICES = {
    "h100": ((9, 0), 80 * 2**30),
    "h200": ((9, 0), 141 * 10**9),
    "a100": ((8, 0), 80 * 2**30),
    "l40s": ((8, 9), 48 * 2**30),
    "l4": ((8, 9), 24 * 2**30),
}
#: the CUDA context by device kind: ``mem_get_info``'s used bytes minus ``memory_reserved`` after a training step,
#: measured (device name as torch reports it, lower case -> bytes). H200: torch 2.11 + CUDA 13.0, driver's lazy
#: module loading, cuBLAS and cuDNN loaded (``benchmarks/gpu_accuracy.py``, 2026-12-04).
CONTEXT_BYTES = {"nvidia h200": 804_061_184}


@dataclass(frozen=True)
class CudaRules:
    """What a CUDA device adds to a traced step (see the module docstring).

    Attributes:
        name: the device kind (``"nvidia h200"``, ``"h100"``, or ``"cuda"`` for one not named).
        capability: the compute capability.
        workspace_bytes: one cuBLAS handle's workspace.
        context_bytes: the CUDA context (``None``: not measured for this kind).
        expandable_segments: the allocator runs with ``expandable_segments:True``.

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

    @property
    def workspaces(self) -> int:
        """The workspaces a training step holds (one per thread that runs matmuls)."""
        return BLAS_THREADS * self.workspace_bytes

    @property
    def allocator(self) -> AllocatorSettings:
        return AllocatorSettings(expandable_segments=self.expandable_segments)


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
    what a strategy set since, e.g. :class:`~lightning_memopt.lightning.MemOptStrategy`).

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
) -> "CudaRules | None":
    """The rules of a target device: ``None`` or ``"cpu"`` (none), ``"cuda"`` (the process's GPU when its
    capability is given, else a compute-capability 9.0 GPU such as the H100/H200), a named GPU
    (:data:`DEVICES`) or a device name as torch reports it (``"NVIDIA H200"``).

    Args:
        device: the target.
        capability: the compute capability (read from the live device by the caller that has one).
        expandable_segments: the allocator's mode; ``None``: as ``PYTORCH_CUDA_ALLOC_CONF`` says.

    Raises:
        ValueError: a device that is neither the CPU, CUDA nor a known GPU, with the fix.

    Example:
        >>> cuda_rules("cpu") is None, cuda_rules("NVIDIA H200").context_bytes > 0, cuda_rules("a100").context_bytes
        (True, True, None)
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
    return CudaRules(name, cap, workspace_bytes(cap), context, expandable)


def replay_run(
    trace: Any,
    param_bytes: "list[int]",
    trainable: "list[bool]",
    buffer_bytes: "list[int]",
    optimizer_kind: str,
    state_tensors: int,
    rules: CudaRules,
    steps: int = 2,
) -> AllocatorResult:
    """The caching allocator's peaks over a run of ``steps`` training steps of a recorded trace.

    The sequence (the order the allocator sees, which decides best fit): the parameters and buffers, one block each,
    as ``model.to(device)`` makes them; per step, every storage of the traced step in op order (the batch and the
    forward's activations, the backward's temporaries and gradients), a cuBLAS workspace per thread at the first
    forward and the first backward op of the first step, ``zero_grad(set_to_none=True)`` after the forward (Lightning
    calls the step, then ``zero_grad``, then backward), and the optimizer's step: its states at the first step
    (``state_tensors`` per trainable parameter, shaped as it), then its temporaries (``"foreach"``: one list shaped as
    the parameters, freed together; ``"single"``: two per parameter, freed at once; ``"fused"``/``"none"``: none).

    Args:
        trace: a :class:`~lightning_memopt.predictor.trace.TraceResult` recorded with ``record=True``.
        param_bytes: every parameter's bytes as the engine holds it, in registration order.
        trainable: per parameter, whether it gets a gradient and optimizer states.
        buffer_bytes: every buffer's bytes.
        optimizer_kind: the optimizer's temporaries kind (``resolve_optimizer``'s second value).
        state_tensors: optimizer state tensors per trainable parameter (AdamW: 2; SGD with momentum: 1).
        rules: the device's rules.
        steps: training steps replayed (the second one is the steady state).

    Example:
        >>> from lightning_memopt.predictor.trace import TraceResult
        >>> step = TraceResult((4096,), (0,), (0,), 0, 0, 0, storages=((0, 1, 4096, 7),), grad_keys=())
        >>> r = replay_run(step, [1000], [True], [], "none", 0, cuda_rules("h100"))
        >>> r.peak_allocated == 1024 + 4096 + 2 * 32 * 2**20  # blocks of 512-byte multiples, two workspaces
        True
    """
    records = list(trace.storages)
    grad_records = _grad_records(records, trace.grad_keys)
    born, freed = defaultdict(list), defaultdict(list)
    for i, (b, f, _, _) in enumerate(records):
        born[b].append(i)
        freed[f].append(i)
    end = len(trace.live)
    events: list[tuple] = [("alloc", ("param", i), n) for i, n in enumerate(param_bytes)]
    events += [("alloc", ("buffer", i), n) for i, n in enumerate(buffer_bytes)]
    held: list[tuple] = []  # the gradients of the last backward, freed at the next zero_grad
    for step in range(steps):
        grads: list[tuple] = []
        for t in range(end + 1):
            if step == 0 and t in (0, trace.forward_end + 1):
                events.append(("alloc", ("workspace", t), rules.workspace_bytes))
            events += [("alloc", (step, i), records[i][2]) for i in born[t]]
            for i in freed[t]:
                if i in grad_records:
                    grads.append((step, i))
                else:
                    events.append(("free", (step, i)))
            if t == trace.forward_end:  # zero_grad(set_to_none=True) between the forward and the backward
                events += [("free", key) for key in held]
                held = []
        held = grads
        trained = [i for i, flag in enumerate(trainable) if flag]
        if step == 0:
            events += [("alloc", ("state", i, k), param_bytes[i]) for i in trained for k in range(state_tensors)]
        if optimizer_kind == "foreach":
            events += [("alloc", ("tmp", step, i), param_bytes[i]) for i in trained]
            events += [("free", ("tmp", step, i)) for i in trained]
        elif optimizer_kind == "single":
            for i in trained:
                first, second = ("tmp", step, i, 0), ("tmp", step, i, 1)  # sqrt, then the division; then addcdiv
                events += [("alloc", first, param_bytes[i]), ("alloc", second, param_bytes[i]), ("free", first),
                           ("free", second)]  # fmt: skip
    return simulate(events, rules.allocator)


def replay_model(trace: Any, reading: Any, param_bytes: int, optimizer: str, rules: CudaRules) -> AllocatorResult:
    """:func:`replay_run` for a model as the predictor reads it: every parameter in the engine's dtype
    (``param_bytes`` per element; integer weights keep theirs), its registered buffers, and the optimizer's states
    and temporaries (:func:`~lightning_memopt.predictor.model_states.resolve_optimizer`)."""
    from lightning_memopt.predictor.model_states import resolve_optimizer

    sizes = [p.numel * (param_bytes if p.floating else p.dtype.itemsize) for p in reading.params]
    buffers = [b.numel * b.dtype.itemsize for b in reading.buffers if not b.attribute]
    state_bytes, kind = resolve_optimizer(optimizer)
    # AdamW: m and v, each shaped as the parameter (fp32 here); SGD with momentum: one buffer
    return replay_run(trace, sizes, [p.trainable for p in reading.params], buffers, kind, state_bytes // 4, rules)


def _grad_records(records: "list[tuple[int, int, int, int]]", grad_keys: "tuple[tuple[int, int], ...]") -> "set[int]":
    """The records that are gradients: the storage handed to the engine (``key``) at op ``at`` (storage keys are
    reused after a storage dies, so the record must span the hand-over)."""
    by_key: dict[int, list[int]] = defaultdict(list)
    for i, (_, _, _, key) in enumerate(records):
        by_key[key].append(i)
    out = set()
    for key, at in grad_keys:
        for i in by_key.get(key, ()):
            b, f = records[i][0], records[i][1]
            if b <= at <= f <= at + 2:
                out.add(i)
                break
    return out


@contextlib.contextmanager
def cuda_kernels() -> "Iterator[None]":
    """Trace on the CPU with the kernels CUDA runs where the CPU's take another path:

    * dropout in training: CUDA runs the fused ``native_dropout``, which saves a 1-byte mask (``aten/src/ATen/native/
      Dropout.cpp``, ``is_fused_kernel_acceptable``: a CUDA input), where the CPU multiplies by a noise tensor of the
      input's dtype and saves that;
    * ``scaled_dot_product_attention``: CUDA's fused backends draw the dropout inside the kernel and save the output
      and the log-sum-exp (plus a Philox seed and offset), where the CPU falls back to the math path with dropout and
      saves the ``s x s`` probabilities and the dropout mask (``sdp_utils_cpp.cpp``: the CPU's flash kernel takes no
      dropout). Without a mask the trace runs the CPU's fused kernel without dropout, which saves what cuDNN's and
      flash's do. With a mask (a padding mask) CUDA runs the memory-efficient kernel, which takes the mask as a bias
      in the query's dtype and saves it for backward (``attention.cu``, ``_scaled_dot_product_efficient_attention``);
      the trace calls that op, whose fake kernel and autograd formula are device-independent. A mask that needs a
      gradient (T5's learned position bias) takes the math path, computed in fp32 as CUDA's math backend does;
    * ``softmax`` and ``log_softmax`` under autocast: CUDA's autocast runs them in fp32 (its ``fp32_set_opt_dtype``
      list, ``aten/src/ATen/autocast_mode.cpp``: a 16-bit input without ``dtype`` gets ``dtype=torch.float32``, so the
      probabilities an eager attention keeps are fp32), where the CPU's autocast leaves them in the input's dtype.

    These functions of ``torch.nn.functional`` are swapped for the trace's duration (models look them up at call
    time, also when a checkpointed block is recomputed in backward) and put back on exit.
    """
    import torch
    import torch.nn.functional as F

    dropout, sdpa, softmax, log_softmax = F.dropout, F.scaled_dot_product_attention, F.softmax, F.log_softmax
    low = (torch.bfloat16, torch.float16)

    def fp32_under_autocast(fn: Any) -> Any:
        def cuda_fn(input: "torch.Tensor", dim: Any = None, _stacklevel: int = 3, dtype: Any = None) -> Any:
            if dtype is None and input.dtype in low and torch.is_autocast_enabled("cpu"):
                dtype = torch.float32
            return fn(input, dim, _stacklevel, dtype)

        return cuda_fn

    def cuda_dropout(input: "torch.Tensor", p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
        if training and 0.0 < p < 1.0 and input.is_floating_point():
            return torch.ops.aten.native_dropout(input, p, True)[0]
        return dropout(input, p, training, inplace)

    def cuda_sdpa(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: Any = None, enable_gqa: bool = False) -> Any:  # fmt: skip
        if attn_mask is None:  # a fused kernel (cuDNN or flash): the CPU's flash kernel saves what they save
            return sdpa(query, key, value, None, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)
        if attn_mask.requires_grad:  # no fused kernel computes a mask's gradient: the math path
            return _math_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        return _efficient_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    F.dropout, F.scaled_dot_product_attention = cuda_dropout, cuda_sdpa
    F.softmax, F.log_softmax = fp32_under_autocast(softmax), fp32_under_autocast(log_softmax)
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention, F.softmax, F.log_softmax = dropout, sdpa, softmax, log_softmax


def _math_attention(
    query: Any, key: Any, value: Any, mask: Any, dropout_p: float, is_causal: bool, scale: Any, gqa: bool
) -> Any:
    """``scaled_dot_product_attention``'s math backend as it runs on CUDA (``attention.cpp``,
    ``_scaled_dot_product_attention_math``): 16-bit inputs computed in fp32, the dropout fused (a 1-byte mask)."""
    import math

    import torch

    low = query.dtype in (torch.bfloat16, torch.float16)
    if gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
    q, k, v = (t.float() for t in (query, key, value)) if low else (query, key, value)
    factor = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(query.shape[-1]))
    attn = (q * factor) @ (k * factor).transpose(-2, -1)
    if is_causal:
        causal = torch.ones(attn.shape[-2:], dtype=torch.bool, device=attn.device).tril()
        attn = attn.masked_fill(~causal, float("-inf"))
    attn = attn.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else attn + mask
    attn = torch.softmax(attn, dim=-1)
    if dropout_p > 0.0:
        attn = torch.ops.aten.native_dropout(attn, dropout_p, True)[0]
    out = attn @ v
    return out.to(query.dtype) if low else out


def _efficient_attention(
    query: Any, key: Any, value: Any, mask: Any, dropout_p: float, is_causal: bool, scale: Any, gqa: bool
) -> Any:
    """``scaled_dot_product_attention`` as CUDA's memory-efficient backend runs it: the mask as an additive bias in
    the query's dtype (a boolean mask becomes 0 / -inf), grouped key/value heads repeated (the kernel has no GQA)."""
    import torch

    if gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, float("-inf"))
    else:
        bias = mask.to(query.dtype)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, bias))
    bias = bias.expand(*query.shape[:-1], key.shape[-2])
    return compat.efficient_attention(query, key, value, bias, grad, dropout_p, is_causal, scale)
