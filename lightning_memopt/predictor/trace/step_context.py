"""The context a traced step runs in: what :func:`~lightning_memopt.predictor.trace.step.trace_step` puts in place
around the step and takes away after it (fake tensors in place of plain tensor attributes, DeepSpeed ZeRO-3's fresh
module inputs, the attention implementation asked for, the module's Python state the step changes), the step function a
framework layer hands in (:func:`stepping`), the user's line that called an op (:func:`call_site`), and readable errors
for a step that cannot be traced."""

import contextlib
import contextvars
import os
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lightning_memopt.core.modules import find_hf_model

#: the step function a framework layer hands in for the traces made in its context (see :func:`stepping`)
_STEP: "contextvars.ContextVar[Callable[[nn.Module, Any], Any] | None]" = contextvars.ContextVar(
    "lightning_memopt_step", default=None
)
#: packages whose frames are not the user's code (the first frame outside them is the user's line)
_LIBRARIES = (
    "torch", "lightning", "lightning_fabric", "pytorch_lightning", "transformers", "torchmetrics", "deepspeed", "peft",
    "accelerate", "lightning_memopt", "liger_kernel", "contextlib", "functools",
)  # fmt: skip


@contextlib.contextmanager
def stepping(step: "Callable[[nn.Module, Any], Any]") -> Iterator[None]:
    """Trace steps with ``step(module, batch) -> output`` where no ``step`` is passed: how a framework layer (the
    Lightning one) runs its module's training step, with the framework's calls stepped over, without the predictor
    importing the framework. ``step`` may return ``NotImplemented`` for a module it does not step (a model built
    from the config for a what-if): that one is stepped by the default.

    Example:
        >>> from lightning_memopt.predictor.precision import resolve_precision
        >>> from lightning_memopt.predictor.trace.step import trace_step
        >>> calls = []
        >>> def step(module, batch):
        ...     calls.append(type(module).__name__)
        ...     return module(batch).sum()
        >>> with stepping(step):
        ...     _ = trace_step(nn.Linear(4, 2), torch.zeros(3, 4), resolve_precision("32-true"))
        >>> calls
        ['Linear']
    """
    token = _STEP.set(step)
    try:
        yield
    finally:
        _STEP.reset(token)


_RELEASED: "contextvars.ContextVar[Callable[[Any], Any] | None]" = contextvars.ContextVar(
    "lightning_memopt_released", default=None
)


def gradients_released(params: "Any" = None) -> None:
    """Tell the trace running now that the step frees the previous step's gradients of ``params`` here (an
    optimizer's ``zero_grad``; ``None``: every parameter's): those it frees before its forward are not alive in it.
    A no-op outside a trace."""
    notify = _RELEASED.get()
    if notify is not None:
        notify(params)


@contextlib.contextmanager
def optimizers_stepped_over(notify: "Callable[[Any], Any]") -> Iterator[None]:
    """For the duration, every torch optimizer's ``step`` runs only the closure it is given and its ``zero_grad``
    calls ``notify(its parameters)`` (as :func:`gradients_released` does): a step that calls its optimizer leaves
    the real parameters, gradients and optimizer states alone (the trace runs on fake ones; the optimizer step is the
    model states' part of the prediction)."""

    def step(self: Any, closure: Any = None, *args: Any, **kwargs: Any) -> Any:
        return closure() if callable(closure) else None

    def zero_grad(self: Any, *args: Any, **kwargs: Any) -> None:
        notify([p for group in self.param_groups for p in group["params"]])

    classes, todo = [], [torch.optim.Optimizer]
    while todo:
        cls = todo.pop()
        classes.append(cls)
        todo += cls.__subclasses__()
    saved = [(cls, name, vars(cls)[name]) for cls in classes for name in ("step", "zero_grad") if name in vars(cls)]
    token = _RELEASED.set(notify)
    for cls, name, _ in saved:
        setattr(cls, name, step if name == "step" else zero_grad)
    try:
        yield
    finally:
        for cls, name, original in saved:
            setattr(cls, name, original)
        _RELEASED.reset(token)


def current_step() -> "Callable[[nn.Module, Any], Any] | None":
    """The step function of the innermost :func:`stepping` (``None`` outside one)."""
    return _STEP.get()


def _library_dirs() -> "tuple[str, ...]":
    """The folders (or files) of the libraries imported now."""
    dirs = ["<frozen "]
    for name in _LIBRARIES:
        path = getattr(sys.modules.get(name), "__file__", None)
        if path:
            dirs.append(os.path.dirname(path) + os.sep if path.endswith("__init__.py") else path)
    return tuple(dirs)


def _is_library(filename: str) -> bool:
    return filename.startswith(_library_dirs())


def _describe(frames: "list[types.FrameType]") -> str:
    """``file:line`` of the first frame (innermost first) outside the libraries, and the innermost library frame
    outside torch when it is another one (a model's code in transformers)."""
    user = next((f for f in frames if not _is_library(f.f_code.co_filename)), None)
    inner = (os.path.dirname(torch.__file__) + os.sep, _own_dir(), os.path.dirname(contextlib.__file__) + os.sep)
    via = next((f for f in frames if not f.f_code.co_filename.startswith(inner)), None)
    if user is None:
        return _where(via) if via is not None else "unknown"
    if via is not None and via is not user:
        return f"{_where(user)} (in {_where(via)})"
    return _where(user)


def _own_dir() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _where(frame: "types.FrameType") -> str:
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def call_site() -> str:
    """Where the op running now was called: ``file:line`` of the user's code (the innermost frame outside torch,
    Lightning, transformers and this package), with the model's line that ran it when that is another library's.

    Example:
        >>> where = call_site()  # a doctest's line is the user's here
        >>> where.startswith("<doctest"), where.rsplit(":", 1)[1]
        (True, '1')
    """
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return _describe(frames)


def _traceback_site(err: BaseException) -> str:
    """:func:`call_site` of the innermost frame of ``err``'s traceback."""
    tb, frames = err.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return _describe(frames[::-1]) if frames else "unknown"


@contextlib.contextmanager
def readable_errors(module: nn.Module):
    """Say which op and which line of the user's code a step that cannot be traced failed at: a data-dependent op
    the tracker could not answer becomes a ``ValueError`` with the fix; any other error gets the line as a note."""
    from torch._subclasses import fake_tensor as ft

    try:
        yield
    except (ft.DataDependentOutputException, ft.DynamicOutputShapeException) as err:
        op = getattr(err, "func", None) or str(err).split("\n")[0]
        raise ValueError(
            f"Expected a training step of {type(module).__name__} whose tensor shapes do not depend on the data, to"
            f" trace it without allocating, got the data-dependent op {op} at {_traceback_site(err)}, whose value"
            " could not be computed. Fix: switch the model to a path with fixed shapes (Hugging Face MoE:"
            " model.set_experts_implementation('grouped_mm')), or pass a parameter count for the model states only."
        ) from err
    except Exception as err:
        if not getattr(err, "_lightning_memopt_site", False):
            err._lightning_memopt_site = True
            err.add_note(f"(while tracing the training step of {type(module).__name__} on fake tensors, at"
                         f" {_traceback_site(err)})")  # fmt: skip
        raise


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Undo what the traced step did to the Python state of ``module`` and its sub-modules: attributes it rebound
    (a counter) are put back and the public lists, dicts and sets it filled (``self.losses.append(loss.item())``,
    torchmetrics' list states) get their contents back, so the real step finds the module as it was."""
    before = []
    for sub in module.modules():
        attrs = dict(vars(sub))
        contents = {key: _copy_of(value) for key, value in attrs.items()
                    if not key.startswith("_") and isinstance(value, (list, dict, set))}  # fmt: skip
        before.append((sub, attrs, contents))
    try:
        yield
    finally:
        for sub, attrs, contents in before:
            now = vars(sub)
            for key, value in attrs.items():
                if now.get(key, value) is not value and key not in ("training",):
                    now[key] = value
            for key, saved in contents.items():
                _restore(attrs[key], saved)


def _copy_of(value: Any) -> Any:
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else set(value)


def _restore(target: Any, saved: Any) -> None:
    if isinstance(target, list):
        target[:] = saved
    else:
        target.clear()
        target.update(saved)


@contextlib.contextmanager
def swapped_attributes(module: nn.Module, fakes: "list[tuple[str, torch.Tensor]]"):
    """Hold the fake tensors in place of the module's plain tensor attributes; on exit restore them and drop the
    fake tensors the step itself stored on the modules (a mask cached in ``forward``)."""
    from torch._subclasses.fake_tensor import FakeTensor

    originals = []
    for name, fake in fakes:
        owner, _, key = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        originals.append((sub, key, sub.__dict__[key]))
        sub.__dict__[key] = fake
    before = {id(sub): dict(vars(sub)) for sub in module.modules()}
    try:
        yield
    finally:
        for sub, key, value in originals:
            sub.__dict__[key] = value
        for sub in module.modules():
            held = before.get(id(sub), {})
            for key, value in list(vars(sub).items()):
                if isinstance(value, FakeTensor):
                    if key in held and not isinstance(held[key], FakeTensor):
                        sub.__dict__[key] = held[key]
                    else:
                        del sub.__dict__[key]


@contextlib.contextmanager
def zero3_module_inputs(module: nn.Module, zero3: bool):
    """As DeepSpeed ZeRO-3's ``_post_backward_module_hook`` does, hand every sub-module its tensor arguments as new
    tensors (a view each): the same tensor passed twice arrives as two objects (``nn.MultiheadAttention`` then
    projects q, k and v separately)."""
    if not zero3:
        yield
        return

    def fresh(_: nn.Module, args: tuple) -> tuple:
        return tuple(a.view_as(a) if isinstance(a, torch.Tensor) else a for a in args)

    handles = [m.register_forward_pre_hook(fresh, prepend=True) for m in module.modules() if m is not module]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def attention(module: nn.Module, attention: "str | None"):
    """Set a Hugging Face model's attention implementation for the trace (plain modules keep theirs): on every
    config its modules hold (T5's encoder and decoder stacks hold copies of the model's config)."""
    hf_model = find_hf_model(module)
    configs = {} if attention is None or hf_model is None else {
        id(c): c for m in hf_model.modules() if hasattr(c := getattr(m, "config", None), "_attn_implementation")
    }  # fmt: skip
    before = {key: c._attn_implementation for key, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = attention
    try:
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation = before[key]
