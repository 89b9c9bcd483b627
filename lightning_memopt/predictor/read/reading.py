"""Read a model once, from the model itself: every parameter with its dtype and whether it trains, the buffers
and plain tensors it holds, its repeated blocks.

Nothing here knows a model family. The model states (:mod:`lightning_memopt.predictor.account.model_states`) are
computed from this reading, the activations from a traced step (:mod:`lightning_memopt.predictor.trace.step`), so a
frozen base, a LoRA adapter, an int8 weight or a BatchNorm running statistic counts exactly as the model holds it.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from lightning_memopt.core.blocks import auto_blocks
from lightning_memopt.core.compat import full_shape
from lightning_memopt.core.modules import find_hf_model, tensor_attributes


class ParamInfo(NamedTuple):
    """One parameter tensor (a tied parameter once, under its first name).

    Attributes:
        name: the parameter's qualified name.
        module: the qualified name of the module that registers it.
        numel: number of elements.
        dtype: its dtype as the model holds it.
        trainable: ``requires_grad``.
    """

    name: str
    module: str
    numel: int
    dtype: torch.dtype
    trainable: bool

    @property
    def floating(self) -> bool:
        """Whether engines cast it to their parameter dtype (integer, e.g. quantized, weights keep theirs)."""
        return self.dtype.is_floating_point or self.dtype.is_complex


class BufferInfo(NamedTuple):
    """A registered buffer, or a tensor held as a plain module attribute (``attribute=True``: engines do not
    cast it)."""

    name: str
    numel: int
    dtype: torch.dtype
    attribute: bool = False

    @property
    def floating(self) -> bool:
        """Whether an engine's ``module.to(dtype)`` casts it."""
        return self.dtype.is_floating_point and not self.attribute


@dataclass(frozen=True)
class ModelReading:
    """What a model holds, read from the module (or only a parameter count).

    Attributes:
        name: where it came from (class name, ``model_type``, preset, or ``"count"``).
        params: the parameter tensors in registration order (the order of DeepSpeed's flat buffers).
        buffers: registered buffers and tensors held as plain attributes.
        blocks: qualified names of the repeated blocks (:func:`~lightning_memopt.core.blocks.find_blocks`).
        step_calls_root: its ``training_step`` calls the module itself (see :func:`step_calls_root`).
        traceable: whether a step can be traced (``False`` for a bare parameter count).

    Example:
        >>> reading = read_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
        >>> reading.num_parameters, reading.trainable_parameters, [b.name for b in reading.buffers]
        (28, 28, ['1.running_mean', '1.running_var', '1.num_batches_tracked'])
        >>> from_count(8e9).num_parameters
        8000000000
    """

    name: str
    params: "tuple[ParamInfo, ...]"
    buffers: "tuple[BufferInfo, ...]" = ()
    blocks: "tuple[str, ...]" = ()
    step_calls_root: bool = False
    traceable: bool = True
    details: "dict[str, Any]" = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.params or self.num_parameters <= 0:
            raise ValueError(f"Expected a model with parameters, got {self.name!r} with none.")

    @property
    def num_parameters(self) -> int:
        """All parameter elements, tied ones once."""
        return sum(p.numel for p in self.params)

    @property
    def trainable_parameters(self) -> int:
        """Elements of the parameters that require gradients."""
        return sum(p.numel for p in self.params if p.trainable)

    @property
    def frozen_parameters(self) -> int:
        """Elements of the parameters that do not require gradients."""
        return self.num_parameters - self.trainable_parameters

    def trainable(self) -> "list[ParamInfo]":
        """The trainable parameters, in registration order."""
        return [p for p in self.params if p.trainable]

    def param_bytes(self, dtype: "torch.dtype | None" = None, trainable: "bool | None" = None) -> int:
        """Bytes of the parameters with floating ones in ``dtype`` (``None``: as held); ``trainable`` filters."""
        return sum(
            p.numel * (dtype if dtype is not None and p.floating else p.dtype).itemsize
            for p in self.params
            if trainable is None or p.trainable == trainable
        )

    def buffer_bytes(self, dtype: "torch.dtype | None" = None) -> int:
        """Bytes of the buffers with floating ones in ``dtype`` (``None``: as held); plain attributes as held."""
        return sum(b.numel * (dtype if dtype is not None and b.floating else b.dtype).itemsize for b in self.buffers)

    def without_gradients(self, names: "Iterable[str]") -> "ModelReading":
        """This reading with the parameters ``names`` frozen: held, without a gradient or optimizer states (what a
        torch optimizer makes of a trainable parameter whose ``.grad`` stays ``None``). Unknown names are ignored.

        Example:
            >>> reading = read_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
            >>> reading.without_gradients(["1.weight", "1.bias"]).trainable_parameters
            20
        """
        names = set(names)
        if not names:
            return self
        params = tuple(p._replace(trainable=False) if p.name in names else p for p in self.params)
        return replace(self, params=params)

    def module_params(self) -> "list[tuple[str, list[ParamInfo]]]":
        """``(module name, its own parameters)`` for every module that registers parameters, in order."""
        out: "dict[str, list[ParamInfo]]" = {}
        for p in self.params:
            out.setdefault(p.module, []).append(p)
        return list(out.items())


def from_count(count: float, name: str = "count") -> ModelReading:
    """A reading from a parameter count alone: trainable parameters in the default dtype, nothing to trace."""
    if isinstance(count, bool) or not count > 0 or count != count or count == float("inf"):
        raise ValueError(f"Expected a positive parameter count, got {count!r}. Fix: e.g. 8e9 or '8B'.")
    param = ParamInfo("count", "", round(count), torch.get_default_dtype(), True)
    return ModelReading(name=name, params=(param,), traceable=False)


def read_model(module: nn.Module, name: "str | None" = None) -> ModelReading:
    """Read ``module``: its parameters (each tensor once), buffers, plain tensor attributes and blocks.

    Works on real, meta and fake parameters alike (only shapes and dtypes are read).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: it has no parameters.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected an nn.Module, got {type(module).__name__}. Fix: pass the model itself.")
    params = []
    seen: set[int] = set()
    for owner, sub in module.named_modules(remove_duplicate=False):
        for pname, p in sub.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{owner}.{pname}" if owner else pname
            numel = math.prod(full_shape(p))  # partitioned by ZeRO-3: its full size
            params.append(ParamInfo(full, owner, numel, p.dtype, bool(p.requires_grad)))
    if not params:
        raise ValueError(
            f"Expected a model with parameters, got {type(module).__name__} with none."
            " Fix: pass the module that is trained (its parameters decide the model states)."
        )
    buffers = [BufferInfo(n, b.numel(), b.dtype) for n, b in module.named_buffers()]
    buffers += [BufferInfo(n, t.numel(), t.dtype, attribute=True) for n, t in tensor_attributes(module)]
    config = getattr(find_hf_model(module), "config", None)
    label = name or getattr(config, "model_type", None) or type(module).__name__
    return ModelReading(
        name=str(label),
        params=tuple(params),
        buffers=tuple(buffers),
        blocks=tuple(auto_blocks(module)),
        step_calls_root=step_calls_root(module),
    )


def step_calls_root(module: nn.Module) -> bool:
    """Whether ``module.training_step`` (or a method of the module it calls) calls the module itself, ``self(...)``.

    Under Lightning the DeepSpeed engine's forward runs ``training_step`` (Lightning's forward redirection,
    ``strategies/strategy.py`` ``_ForwardRedirection``), and ZeRO-3 registers a forward pre-hook on that root module
    that resets the parameter trace (DeepSpeed 0.19.8 ``zero/parameter_offload.py`` ``_start_of_forward_hook`` ->
    ``PartitionedParameterCoordinator.reset_step``). A ``self(...)`` inside the step fires it a second time, so the
    recorded trace never completes, and without a complete trace ``release_sub_module`` frees every gathered
    parameter after each sub-module's forward and backward and nothing is prefetched. Read from the source
    (``ast``); ``False`` when the source is unavailable.

    Example:
        >>> class Net(nn.Linear):
        ...     def training_step(self, batch, batch_idx):
        ...         return self(batch).sum()
        >>> step_calls_root(Net(2, 2)), step_calls_root(nn.Linear(2, 2))
        (True, False)
    """
    import ast
    import inspect
    import textwrap

    cls = type(module)
    todo, seen = ["training_step"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        func = getattr(cls, name, None)
        if func is None or not inspect.isfunction(func) or func.__module__.startswith(("lightning.", "torch.")):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
        except (OSError, TypeError, SyntaxError):
            continue
        fn = tree.body[0]
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or not fn.args.args:
            continue
        me = fn.args.args[0].arg
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Name) and node.func.id == me:
                return True
            target = node.func
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == me:
                todo.append(target.attr)
    return False
