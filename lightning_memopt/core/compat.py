"""Every private API of torch, DeepSpeed and transformers the package uses, in one place, with version guards.

(Lightning's private APIs live in the Lightning layer's own compat module, the only place that imports Lightning.)
Each helper says what it touches and what happens on a version that lacks it.
"""

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's shape, also when DeepSpeed ZeRO-3 has partitioned it away (its data then holds nothing; the
    shape is DeepSpeed's private ``ds_shape``, DeepSpeed >= 0.3)."""
    return getattr(param, "ds_shape", None) or param.shape


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


@contextlib.contextmanager
def deepspeed_hooks_suspended(module: nn.Module) -> Iterator[None]:
    """Take DeepSpeed's module hooks off ``module`` for the duration (ZeRO-3 gathers and releases partitioned
    parameters around every sub-module, ``zero/parameter_offload.py``): a fake-tensor trace of a module inside a
    running engine then steps the bare module. The hooks are told apart by their defining module (``deepspeed.*``)
    in the modules' private hook dicts (torch >= 2.0), put back in their order on exit."""
    saved = []
    for sub in module.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(sub, attr, None)
            if hooks and any(_from_deepspeed(h) for h in hooks.values()):
                saved.append((sub, attr, dict(hooks)))
                for key in [k for k, h in hooks.items() if _from_deepspeed(h)]:
                    del hooks[key]
    try:
        yield
    finally:
        for sub, attr, hooks in saved:
            current = getattr(sub, attr)
            current.clear()
            current.update(hooks)


def _from_deepspeed(hook: Any) -> bool:
    return str(getattr(hook, "__module__", "") or "").startswith("deepspeed")


@contextlib.contextmanager
def reparametrized(module: nn.Module, tensors: "dict[str, torch.Tensor]") -> Iterator[None]:
    """Use ``tensors`` (by qualified name) as the module's parameters and buffers for the duration, tied weights
    kept tied: torch's private ``torch.nn.utils.stateless._reparametrize_module``, the engine of the public
    ``torch.func.functional_call`` (torch >= 2.0)."""
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(module, tensors, tie_weights=True, strict=False):
        yield


def current_autograd_node() -> Any:
    """The autograd ``Node`` whose backward runs now (``None`` outside backward): torch's private
    ``torch._C._current_autograd_node`` (torch >= 2.1; ``None`` where it is missing)."""
    getter = getattr(torch._C, "_current_autograd_node", None)
    return getter() if getter is not None else None


@contextlib.contextmanager
def outside_dispatch_modes() -> Iterator[None]:
    """Run eager code with every active ``TorchDispatchMode`` (fake tensors, trackers) switched off: torch's private
    ``torch.utils._python_dispatch._disable_current_modes`` (torch >= 2.0)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass in this thread (``_current_graph_task_id``)."""
    return torch._C._current_graph_task_id() != -1


@contextlib.contextmanager
def no_packed_sequence_detection() -> Iterator[None]:
    """Keep transformers' packed-sequence detection out of a fake-tensor trace: it reads position ids' values
    (``transformers.masking_utils.find_packed_sequence_indices``, transformers >= 4.53), which fake tensors do not
    have, and would route the step to a mask the real run does not build. A no-op where it does not exist."""
    mu = sys.modules.get("transformers.masking_utils")
    if mu is None:
        try:
            import transformers.masking_utils as mu  # optional, only when transformers is there
        except ImportError:
            mu = None
    with _swapped(mu, "find_packed_sequence_indices", lambda position_ids: None):
        yield


@contextlib.contextmanager
def fake_tensors_run_eagerly() -> Iterator[None]:
    """Let transformers' value checks run in a fake-tensor trace as they run in the eager step it stands for.

    ``transformers.utils.import_utils.is_tracing(tensor)`` is true for any ``FakeTensor`` (``is_fake_tensor``,
    transformers >= 4.5x), and the mask code then skips the checks that read values: ``_ignore_causal_mask_sdpa``
    (``masking_utils``) builds a 4-D causal mask where the eager step sees an all-ones padding mask and calls SDPA
    with ``is_causal=True`` (no mask at all); BART's decoder makes such a padding mask itself (``torch.ones``), a
    Llama gets one from a tokenizer's batch. The trace answers those values from its shadows (the batch, factory
    outputs), so inside it a fake tensor is not "tracing". ``is_tracing`` looks ``is_fake_tensor`` up in its own
    module at every call, so every importer of ``is_tracing`` sees the change; a no-op where it does not exist."""
    with _swapped(sys.modules.get("transformers.utils.import_utils"), "is_fake_tensor", lambda x: False):
        yield


@contextlib.contextmanager
def _swapped(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.<name>`` set to ``value`` for the duration and put back after; a no-op where it does not exist."""
    original = getattr(owner, name, None)
    if original is None:
        yield
        return
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def checkpoint_regions(on_region: "Callable[[], None]") -> Iterator[None]:
    """Call ``on_region()`` as every ``torch.utils.checkpoint.checkpoint`` region starts (``checkpoint_sequential``'s
    too), reentrant or not, from inside ``checkpoint`` (its caller's frame is up the stack): torch's private
    ``CheckpointFunction.apply`` (reentrant) and ``_checkpoint_without_reentrant_generator`` (non-reentrant), which
    ``checkpoint`` looks up at every call (torch >= 2.1). A variant a version lacks is not reported."""
    import torch.utils.checkpoint as ckpt

    function = getattr(ckpt, "CheckpointFunction", None)
    generator = getattr(ckpt, "_checkpoint_without_reentrant_generator", None)
    saved_apply = function.__dict__.get("apply") if function is not None else None

    if function is not None:
        inherited = function.apply

        def apply(cls: Any, *args: Any) -> Any:
            on_region()
            return inherited(*args)

        function.apply = classmethod(apply)
    if generator is not None:

        def without_reentrant(*args: Any, **kwargs: Any) -> Any:
            on_region()
            return generator(*args, **kwargs)

        ckpt._checkpoint_without_reentrant_generator = without_reentrant
    try:
        yield
    finally:
        if generator is not None:
            ckpt._checkpoint_without_reentrant_generator = generator
        if function is not None:
            if saved_apply is None:
                del function.apply
            else:
                function.apply = saved_apply


def deepspeed_original_linear() -> Any:
    """PyTorch's own ``torch.nn.functional.linear`` as DeepSpeed saved it before ZeRO-3's ``zero.Init`` replaced it
    process-wide with ``zero3_linear_wrap`` (DeepSpeed's private ``InsertPostInitMethodToModuleSubClasses.linear_bk``,
    "This will persist unless manually reset", ``deepspeed/runtime/zero/partition_parameters.py``); ``None`` when
    DeepSpeed is not imported or never replaced it."""
    partition = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    holder = getattr(partition, "InsertPostInitMethodToModuleSubClasses", None)
    return getattr(holder, "linear_bk", None)


def restore_torch_linear() -> None:
    """Undo ZeRO-3's process-wide replacement of ``torch.nn.functional.linear`` (see
    :func:`deepspeed_original_linear`); the next ZeRO-3 ``zero.Init`` swaps it in again."""
    original = deepspeed_original_linear()
    if original is not None:
        torch.nn.functional.linear = original


@contextlib.contextmanager
def linear_of_the_run(zero3: bool) -> Iterator[None]:
    """Trace with the ``torch.nn.functional.linear`` the run will use: DeepSpeed's ``zero3_linear_wrap``
    (``LinearFunctionForZeroStage3``: ``matmul`` then an in-place bias add in forward, its own reshapes and matmuls
    in backward) for a ZeRO-3 run, PyTorch's own for any other, whatever ran earlier in the process."""
    functional = torch.nn.functional
    original = deepspeed_original_linear()
    wanted = functional.linear if original is None else original
    if zero3:
        from deepspeed.runtime.zero.linear import zero3_linear_wrap

        wanted = zero3_linear_wrap
    if functional.linear is wanted:
        yield
        return
    replaced, functional.linear = functional.linear, wanted
    try:
        yield
    finally:
        functional.linear = replaced


@contextlib.contextmanager
def triton_launches_skipped() -> Iterator[None]:
    """Make every Triton kernel launch (``kernel[grid](...)``) a no-op for the duration: under fake tensors a
    library's Python wrapper (Liger's) still allocates what its kernels write into, exactly as in the eager run,
    while the kernels themselves, which need a GPU, do not run. Patches ``triton.runtime.jit.KernelInterface
    .__getitem__`` (triton >= 2.1: ``JITFunction``, ``Autotuner`` and ``Heuristics`` launch through it); a no-op
    where triton is not imported."""
    jit = sys.modules.get("triton.runtime.jit")
    interface = getattr(jit, "KernelInterface", None)
    if interface is None:
        yield
        return
    original = interface.__getitem__
    interface.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
    try:
        yield
    finally:
        interface.__getitem__ = original


def efficient_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, grad: bool, dropout_p: float,
    is_causal: bool, scale: "float | None",
) -> torch.Tensor:
    """The output of ``aten._scaled_dot_product_efficient_attention`` (private; the memory-efficient SDPA backend's
    op, with its device-independent fake kernel and autograd formula). Its signature is unchanged since torch 2.1.

    Raises:
        RuntimeError: a torch without the op, with the fix.
    """
    op = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)
    if op is None:  # pragma: no cover - torch < 2.1
        raise RuntimeError(
            f"Expected torch >= 2.1 (aten._scaled_dot_product_efficient_attention), got {torch.__version__}."
            " Fix: upgrade torch."
        )
    return op(query, key, value, bias, grad, dropout_p, is_causal, scale=scale)[0]


#: the environment variables torch reads its caching allocator's settings from, the first set one wins
ALLOC_CONF_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def allocator_variable(env: "Mapping[str, str] | None" = None) -> "tuple[str, str] | None":
    """The allocator variable set in ``env`` (``None``: the process's environment), with its value; ``None`` if
    neither is set.

    Example:
        >>> allocator_variable({"PYTORCH_ALLOC_CONF": "expandable_segments:True"})
        ('PYTORCH_ALLOC_CONF', 'expandable_segments:True')
    """
    import os

    env = os.environ if env is None else env
    return next(((name, env[name]) for name in ALLOC_CONF_VARIABLES if env.get(name)), None)


#: what :func:`set_allocator_settings` set in this process (torch < 2.13's getter returns only the environment's string)
_SET_ALLOCATOR_OPTIONS: "dict[str, str]" = {}


def allocator_options(settings: "str | None" = None) -> "dict[str, str]":
    """The caching allocator's options, ``{key: value}`` with keys and values lower-cased, from a settings string
    (``"expandable_segments:True,max_split_size_mb:128"``); ``None``: the settings torch holds now, that is
    ``PYTORCH_ALLOC_CONF`` / ``PYTORCH_CUDA_ALLOC_CONF`` as read at start-up and what :func:`set_allocator_settings`
    changed since (``torch._C._accelerator_getAllocatorSettings``, private, torch >= 2.9; older torch: the
    environment variable).

    Example:
        >>> allocator_options("max_split_size_mb:128,expandable_segments:True")
        {'max_split_size_mb': '128', 'expandable_segments': 'true'}
    """
    if settings is None:
        getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
        live = getter() if getter is not None else (allocator_variable() or ("", ""))[1]
        return {**allocator_options(live), **_SET_ALLOCATOR_OPTIONS}
    pairs = (item.split(":", 1) for item in settings.split(",") if ":" in item)
    return {key.strip().lower(): value.strip().lower() for key, value in pairs}


def set_allocator_settings(settings: str) -> None:
    """Change caching-allocator settings at run time, e.g. ``"expandable_segments:True"``: the keys given change, the
    others keep their value; segments already reserved keep their kind, new ones follow the setting
    (``torch._C._accelerator_setAllocatorSettings``, private, torch >= 2.9; before: the same parser behind
    ``torch.cuda.memory._set_allocator_settings``)."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # pragma: no cover - torch < 2.9
        setter = torch.cuda.memory._set_allocator_settings
    setter(settings)
    _SET_ALLOCATOR_OPTIONS.update(allocator_options(settings))


def record_cuda_memory_history(enabled: bool, max_entries: int, frames: bool) -> None:
    """``torch.cuda.memory._record_memory_history`` (private, torch >= 2.1): every allocation and free, with Python
    frames (``context="all", stacks="python"``: no C++ unwinding) or without any (``context=None``)."""
    torch.cuda.memory._record_memory_history(enabled="all" if enabled else None,
                                             context="all" if frames else None, stacks="python",
                                             max_entries=max_entries)  # fmt: skip


def dump_cuda_memory_snapshot(path: str) -> None:
    """``torch.cuda.memory._dump_snapshot`` (private, torch >= 2.1): the snapshot pickle that pytorch.org/memory_viz
    opens."""
    torch.cuda.memory._dump_snapshot(path)
