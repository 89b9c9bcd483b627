"""CUDA's kernels in a trace run on the CPU: where CUDA's kernels keep other tensors than the CPU's (fused dropout,
the fused attention backends, autocast's fp32 softmax and its cross-entropy), the trace calls what CUDA runs
(:func:`cuda_kernels`); where a CUDA kernel allocates a temporary of its own and frees it before it returns, the
trace counts it at that op (:func:`kernel_scratch`)."""

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from lightning_memopt.core import compat
from lightning_memopt.predictor.device import KernelDevice


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
      gradient (T5's learned position bias) takes the math path, computed in fp32 as CUDA's math backend does. Either
      backend gets its arguments as autocast hands them over (every floating one cast to 16 bits: Gemma 3's queries
      come in fp32) and computes outside autocast, as the dispatcher runs a kernel;
    * ``softmax`` and ``log_softmax`` under autocast: CUDA's autocast runs them in fp32 (its ``fp32_set_opt_dtype``
      list, ``aten/src/ATen/autocast_mode.cpp``: a 16-bit input without ``dtype`` gets ``dtype=torch.float32``, so the
      probabilities an eager attention keeps are fp32), where the CPU's autocast leaves them in the input's dtype;
    * ``cross_entropy`` of 16-bit logits under autocast: the CPU's autocast lists ``cross_entropy_loss`` as fp32 and
      casts the logits to fp32 before the log-softmax (an fp32 copy next to the fp32 log-probabilities); CUDA's lists
      it nowhere, so its composite runs (``aten/src/ATen/native/LossNLL.cpp`` ``cross_entropy_loss``:
      ``log_softmax(self, class_dim, self.scalar_type())``, then ``nll_loss``, which CUDA's autocast runs in fp32):
      16-bit log-probabilities, and their fp32 copy kept by ``nll_loss``. Label smoothing and probability targets
      take other composites and keep the CPU's path.

    These functions of ``torch.nn.functional`` are swapped for the trace's duration (models look them up at call
    time, also when a checkpointed block is recomputed in backward) and put back on exit.
    """
    import torch
    import torch.nn.functional as F

    dropout, sdpa, softmax, log_softmax = F.dropout, F.scaled_dot_product_attention, F.softmax, F.log_softmax
    cross_entropy = F.cross_entropy
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
        # autocast's lower-precision policy (both devices list ``scaled_dot_product_attention``) casts the floating
        # arguments, then runs the backend without autocast: its own computation is not autocast's
        query, key, value, attn_mask = _autocast_arguments(query, key, value, attn_mask)
        backend = _math_attention if attn_mask.requires_grad else _efficient_attention  # no fused mask gradient
        with torch.autocast("cpu", enabled=False):
            return backend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    def cuda_cross_entropy(input: "torch.Tensor", target: "torch.Tensor", weight: Any = None, size_average: Any = None,
                           ignore_index: int = -100, reduce: Any = None, reduction: str = "mean",
                           label_smoothing: float = 0.0) -> Any:  # fmt: skip
        plain = label_smoothing == 0.0 and size_average is None and reduce is None and not target.is_floating_point()
        if plain and input.dtype in low and torch.is_autocast_enabled("cpu"):
            class_dim = 0 if input.dim() == 1 else 1
            log_probs = torch.log_softmax(input, class_dim, dtype=input.dtype)
            return F.nll_loss(log_probs, target, weight, ignore_index=ignore_index, reduction=reduction)
        return cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)

    F.dropout, F.scaled_dot_product_attention, F.cross_entropy = cuda_dropout, cuda_sdpa, cuda_cross_entropy
    F.softmax, F.log_softmax = fp32_under_autocast(softmax), fp32_under_autocast(log_softmax)
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention, F.softmax, F.log_softmax = dropout, sdpa, softmax, log_softmax
        F.cross_entropy = cross_entropy


def kernel_scratch(func: Any, args: "tuple[Any, ...]", device: "KernelDevice | None" = None) -> "tuple[int, ...]":
    """The blocks CUDA's kernel for ``func`` asks the caching allocator for and frees before it returns, on top of
    its outputs: memory no tensor of the trace holds, which ``max_memory_allocated`` counts at that op.

    * ``_softmax_backward_data``: ``Tensor tmp = grad * output;`` before the reduction (``aten/src/ATen/native/cuda/
      SoftMax.cu``, ``softmax_backward_cuda_out``; the CPU's kernel has no such tensor). The gradient's size in the
      promoted dtype: in an eager attention's backward, one more score-sized tensor next to the gradient, the saved
      probabilities and the new gradient (a recorded H200 step allocates it, then frees it before the saved
      probabilities go).
    * ``sum`` and ``mean`` over dimensions: a reduction split across thread blocks stages its partial results in
      global memory (``aten/src/ATen/native/cuda/Reduce.cuh``, ``gpu_reduce_kernel``: a buffer of
      ``global_memory_size()`` and semaphores of ``semaphore_size()``), as :func:`reduce_buffers` works out. A
      norm's weight gradient summed over 4 x 1,024 tokens of 1,024 features takes 32 MiB there (twice its fp32
      input), recorded on an H200 once per RMSNorm in every step.

    Args:
        func: the aten op.
        args: its positional arguments (fake tensors).
        device: the GPU's multiprocessors (a reduction's launch depends on them); ``None``: an H100's.

    Example:
        >>> import torch
        >>> grad = torch.zeros(2, 4, 8, 8)
        >>> kernel_scratch(torch.ops.aten._softmax_backward_data.default, (grad, grad, -1, torch.float32))
        (2048,)
        >>> kernel_scratch(torch.ops.aten._log_softmax_backward_data.default, (grad, grad, -1, torch.float32))
        ()
        >>> [n // 2**20 for n in kernel_scratch(torch.ops.aten.sum.dim_IntList, (torch.zeros(4, 1024, 1024), [0, 1]))]
        [32, 0]
    """
    import torch

    if func is torch.ops.aten._softmax_backward_data.default:
        grad, output = args[0], args[1]
        return (grad.numel() * torch.promote_types(grad.dtype, output.dtype).itemsize,)
    if func in (torch.ops.aten.sum.dim_IntList, torch.ops.aten.mean.dim) and args[0].is_floating_point():
        dims = args[1] if len(args) > 1 else None
        return reduce_buffers(args[0], dims, device or KernelDevice())
    return ()


def reduce_buffers(input: Any, dims: "Sequence[int] | None", device: KernelDevice) -> "tuple[int, ...]":
    """The staging buffer and the semaphores CUDA's ``sum``/``mean`` of a floating ``input`` over ``dims`` allocates
    (``Reduce.cuh``; ``()`` when the reduction stays within thread blocks).

    ``TensorIterator`` first puts the reduced dimensions before the kept ones, each group ordered by the input's
    strides and merged where contiguous; ``setReduceConfig`` then lays the threads out: along the reduced dimension
    when it is the fastest-moving one, else along the outputs (``output_vec_size`` of them per thread, at most 4,
    ``get_output_vec_size``); 512 threads a block (``mnt_wrapper``), warps split the input when each thread keeps at
    least ``min(16 x block height, 256)`` values, and when each still has 256 or more and the grid is small against
    ``multiprocessors x (threads per multiprocessor / threads per block)``, thread blocks split it too
    (``ctas_per_output``): the partial results of every block go to a global buffer of
    ``sizeof(accumulator) x outputs x ctas_per_output`` (times ``block width x output_vec_size`` when the lanes of a
    warp hold different outputs), with one ``int`` semaphore per block column. The accumulator is fp32 (fp64 for
    double). Not modelled: inputs past 32-bit indexing (split into several launches), which keep the same buffers
    per launch.

    Example:
        >>> import torch
        >>> reduce_buffers(torch.zeros(4096, 4096, dtype=torch.bfloat16), [0], KernelDevice())  # a bias gradient
        (134217728, 128)
        >>> reduce_buffers(torch.zeros(4096, 4096, dtype=torch.bfloat16), [0], KernelDevice(108))  # an A100's 108 SMs
        (113246208, 128)
        >>> reduce_buffers(torch.zeros(4, 1024, 1024), [-1], KernelDevice())  # a norm's statistics: in blocks
        ()
    """
    import math

    ndim = input.dim()
    if ndim == 0:
        return ()
    reduced = set(range(ndim)) if not dims else {d % ndim for d in dims}
    size, stride, item = list(input.shape), list(input.stride()), input.element_size()

    def group(members: "list[int]") -> "list[tuple[int, int]]":
        """(size, stride in bytes) of one group, fastest first, contiguous neighbours merged, size-1 ones gone."""
        out: "list[tuple[int, int]]" = []
        for d in sorted((d for d in members if size[d] != 1), key=lambda d: stride[d]):
            if out and out[-1][0] * out[-1][1] == stride[d] * item:
                out[-1] = (out[-1][0] * size[d], out[-1][1])
            else:
                out.append((size[d], stride[d] * item))
        return out

    red, kept = group(sorted(reduced)), group([d for d in range(ndim) if d not in reduced])
    num_outputs = math.prod(n for n, _ in kept)
    inputs_per_output = math.prod(n for n, _ in red)
    if not red or num_outputs == 0 or inputs_per_output == 0:
        return ()
    fastest = not kept or red[0][1] < kept[0][1]
    dim0, dim1 = (inputs_per_output, num_outputs) if fastest else (num_outputs, inputs_per_output)
    fastest_stride = red[0][1] if fastest else kept[0][1]
    output_vec = 1
    if fastest_stride == item and not fastest:  # "vectorize along output"
        output_vec = 4
        for n in [kept[0][0]] + [st // item for _, st in red + kept[1:]]:
            while n % output_vec:
                output_vec //= 2
        dim0 //= output_vec
    elif fastest_stride == item and dim0 >= 128 and len(red) == 1:  # "vectorize along input"
        dim0 //= 4
    max_threads = 512 // output_vec

    def last_pow2(n: int) -> int:
        return 1 << (max(n, 1).bit_length() - 1)

    dx = last_pow2(dim0) if dim0 < max_threads else max_threads
    dy = last_pow2(dim1) if dim1 < max_threads else max_threads
    block_height = min(dy, max_threads // min(dx, 32))
    block_width = min(dx, max_threads // block_height)
    num_threads = block_width * block_height
    step_input, step_output = 1, 1
    if fastest:
        step_input *= block_width
    else:
        step_output *= block_width

    def values_per_thread() -> int:
        return -(-inputs_per_output // step_input)

    split_warps = values_per_thread() >= min(block_height * 16, 256)
    if split_warps:
        step_input *= block_height
    else:
        step_output *= block_height
    grid = -(-(num_outputs // output_vec) // step_output)
    target = device.multiprocessors * (device.threads_per_multiprocessor // num_threads)
    if not (split_warps and values_per_thread() >= 256 and grid <= target):
        return ()
    per_output = max(min(-(-target // grid), -(-values_per_thread() // 16)), -(-values_per_thread() // 256))
    if per_output <= 1:
        return ()
    accumulator = 8 if input.dtype.itemsize == 8 else 4
    buffer = accumulator * num_outputs * per_output * (1 if fastest else block_width * output_vec)
    return buffer, 4 * grid


def _autocast_arguments(*tensors: Any) -> "tuple[Any, ...]":
    """``scaled_dot_product_attention``'s arguments as autocast hands them to the backend (``autocast_mode.cpp``,
    ``lower_precision_fp``: every floating tensor cast to the autocast dtype; a boolean mask is left alone)."""
    import torch

    if not torch.is_autocast_enabled("cpu"):
        return tensors
    dtype = torch.get_autocast_dtype("cpu")
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t for t in tensors)


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
