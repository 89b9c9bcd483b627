"""The repeated blocks of a model, and the activation-checkpoint wrapper put around them.

One rule decides which modules are "the blocks" for every part of the package: the checkpointing transform
wraps them, the predictor's trace checkpoints and synthesises them, the budget search counts them.

``"auto"``: the classes a Hugging Face model names in ``_no_split_modules`` (transformers' own notion of a
block: the unit it never splits across devices), else the longest ``nn.ModuleList`` whose children share one
class; outermost matches only, in forward (registration) order. An encoder-decoder therefore has its encoder
blocks then its decoder blocks.

The wrapper replaces a block's ``forward`` on the instance (module names, ``state_dict`` keys and hooks are
unchanged, as in transformers' ``GradientCheckpointingLayer``) with non-reentrant ``torch.utils.checkpoint``
(Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost", section 3): the block keeps its inputs in
forward and recomputes its activations in backward. Under DeepSpeed ZeRO-3 (parameters carrying ``ds_id``)
the recomputation's metadata check is off (``determinism_check="none"``): partitioned parameters' recorded
shapes differ from the gathered ones (transformers #47254, DeepSpeed #4332).
"""

import contextlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from types import MethodType
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

Policy = str | type | Iterable[str | type] | Callable[[nn.Module], bool]

_FLAG = "_memopt_checkpointed"
_ORIGINAL = "_memopt_original_forward"
#: Hugging Face's per-layer switch (``GradientCheckpointingLayer.gradient_checkpointing``)
_HF_FLAG = "gradient_checkpointing"
_UNSET = object()
#: frames between a checkpoint region and the code that opened it: torch's, functools' and the region hook's
_INSIDE = (
    os.path.dirname(torch.__file__) + os.sep,
    os.path.dirname(contextlib.__file__) + os.sep + "functools",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "compat.py"),
)
#: keyword arguments of Hugging Face layers that write a KV cache: a recomputation would write it twice
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def find_blocks(module: nn.Module, policy: Policy = "auto") -> list[str]:
    """The names of the blocks ``policy`` selects in ``module``, in forward order (outermost matches only).

    Args:
        module: the model (a LightningModule works: its module tree is searched).
        policy: ``"auto"`` (see the module docstring), a class, a class name, a set of those, or a callable
            ``module -> bool``.

    Raises:
        ValueError: a class name that no submodule has, or a policy that matches no module.
        TypeError: a policy of another type.

    Example:
        >>> stack = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
        >>> find_blocks(stack)
        ['1.0', '1.1', '1.2']
        >>> find_blocks(stack, {"Linear"})
        ['0', '1.0', '1.1', '1.2']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected an nn.Module, got {type(module).__name__}. Fix: pass the model.")
    if isinstance(policy, str) and policy == "auto":
        names = auto_blocks(module)
        if not names:
            raise ValueError(
                f"Expected `policy='auto'` to find repeated blocks in {type(module).__name__}, got none (no"
                " Hugging Face `_no_split_modules` and no `nn.ModuleList` of same-class blocks). Fix: pass"
                " the block classes, e.g. `policy={'MyBlock'}`, or a callable."
            )
        return names
    match = _matcher(module, policy)
    names = _outermost([name for name, sub in module.named_modules() if name and match(sub)])
    if not names:
        raise ValueError(
            f"Expected the checkpointing policy {policy!r} to match a submodule of {type(module).__name__},"
            " got no match. Fix: name the repeated block class, e.g. `policy={'DecoderLayer'}`, or use 'auto'."
        )
    return names


def auto_blocks(module: nn.Module) -> list[str]:
    """The ``"auto"`` blocks of ``module`` (empty when it has none).

    Example:
        >>> auto_blocks(nn.Sequential(nn.Linear(2, 2)))
        []
    """
    no_split: set[str] = set()
    for sub in module.modules():
        names = getattr(type(sub), "_no_split_modules", None)
        if isinstance(names, (list, tuple, set)) and hasattr(sub, "config"):
            no_split.update(n for n in names if isinstance(n, str))
    if no_split:
        found = _outermost([n for n, sub in module.named_modules() if n and type(sub).__name__ in no_split])
        if found:
            return found
    best: list[str] = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList) and len(sub) > len(best) and len({type(c) for c in sub}) == 1:
            prefix = f"{name}." if name else ""
            best = [f"{prefix}{i}" for i in range(len(sub))]
    return best


def num_checkpointed(activation_checkpointing: "bool | float | int", num_blocks: int) -> int:
    """How many leading blocks a setting checkpoints: ``True``/``False``, a fraction in (0, 1] (the first
    ``ceil(fraction * n)``) or a count.

    Example:
        >>> num_checkpointed(0.5, 32), num_checkpointed(True, 32), num_checkpointed(3, 32), num_checkpointed(0.3, 4)
        (16, 32, 3, 2)
    """
    if isinstance(activation_checkpointing, bool):
        return num_blocks if activation_checkpointing else 0
    if isinstance(activation_checkpointing, float):
        if not 0.0 < activation_checkpointing <= 1.0:
            raise ValueError(
                f"Expected a checkpointed fraction in (0, 1], got {activation_checkpointing!r}."
                " Fix: e.g. 0.5 for the first half of the blocks."
            )
        return math.ceil(activation_checkpointing * num_blocks - 1e-9)
    if isinstance(activation_checkpointing, int):
        if activation_checkpointing < 0:
            raise ValueError(
                f"Expected a non-negative number of checkpointed blocks, got {activation_checkpointing}."
                " Fix: e.g. 4, or True for all."
            )
        return min(activation_checkpointing, num_blocks)
    raise TypeError(
        "Expected `activation_checkpointing` to be a bool, a fraction in (0, 1] or a number of blocks, got"
        f" {type(activation_checkpointing).__name__}. Fix: e.g. True or 0.5."
    )


def checkpoint_flags(
    module: nn.Module, activation_checkpointing: "bool | float | int | None", blocks: "Iterable[str] | None" = None
) -> "list[bool]":
    """Whether each of ``module``'s blocks runs checkpointed: as the module is (``None``), or as a setting would make
    it (the first :func:`num_checkpointed` blocks). ``blocks``: their names, when already found (:func:`auto_blocks`).

    Example:
        >>> stack = nn.ModuleList([nn.Linear(2, 2) for _ in range(4)])
        >>> checkpoint_flags(stack, 0.5), checkpoint_flags(stack, None)
        ([True, True, False, False], [False, False, False, False])
    """
    names = list(blocks) if blocks is not None else auto_blocks(module)
    if activation_checkpointing is None:
        return [is_checkpointed(module.get_submodule(name)) for name in names]
    count = num_checkpointed(activation_checkpointing, len(names))
    return [i < count for i in range(len(names))]


@contextlib.contextmanager
def checkpointed_as(
    module: nn.Module, activation_checkpointing: "bool | float | int | None", wrap: bool = True
) -> Iterator["list[str]"]:
    """Run ``module`` with its first blocks checkpointed as ``activation_checkpointing`` says and the others not,
    for the duration (``None``: as it is); yields the names of the blocks it wrapped with :func:`checkpoint_block`.

    A block keeps the checkpointing the model gives it: one the model checkpoints already (this package's wrapper,
    a Hugging Face layer with ``gradient_checkpointing`` on) runs as it is, and a Hugging Face layer whose
    checkpointing function was set (``gradient_checkpointing_enable``: reentrant or not, offloaded or not) is
    switched by its own flag. Only a block the model has no checkpointing for gets this package's wrapper, and
    with ``wrap=False`` not even that (a model whose own ``torch.utils.checkpoint`` calls checkpoint it). Blocks
    not selected are switched off. Every block is restored on exit."""
    if activation_checkpointing is None:
        yield []
        return
    names = auto_blocks(module)
    blocks = [module.get_submodule(name) for name in names]
    saved = [(b, b.__dict__.get(_FLAG), b.__dict__.get(_HF_FLAG, _UNSET)) for b in blocks]
    wrapped = []
    for name, block, flag in zip(names, blocks, checkpoint_flags(module, activation_checkpointing)):
        if flag and is_checkpointed(block):
            continue
        if not flag:
            if getattr(block, _HF_FLAG, None) is not None:
                setattr(block, _HF_FLAG, False)
            uncheckpoint_block(block)
        elif _hf_switchable(block):
            setattr(block, _HF_FLAG, True)
        elif wrap:
            checkpoint_block(block)
            wrapped.append(name)
    try:
        yield wrapped
    finally:
        for block, ours, hf_flag in saved:
            if ours is None:
                uncheckpoint_block(block)
            else:
                checkpoint_block(block, ours["reentrant"])
            if hf_flag is not _UNSET:
                block.__dict__[_HF_FLAG] = hf_flag
            else:
                block.__dict__.pop(_HF_FLAG, None)


def _hf_switchable(block: nn.Module) -> bool:
    """A Hugging Face layer (``GradientCheckpointingLayer``) that holds the checkpointing function the model set."""
    return getattr(block, _HF_FLAG, None) is not None and callable(block.__dict__.get("_gradient_checkpointing_func"))


@contextlib.contextmanager
def own_checkpoints() -> Iterator["list[str]"]:
    """Collect, for the duration, where the model's own code opens a ``torch.utils.checkpoint`` region in a forward
    (``file:line`` of the caller, once per region): every region but those this package's wrapper and Hugging
    Face's ``GradientCheckpointingLayer`` open (the ones :func:`checkpointed_as` switches), and not again when a
    checkpointed region recomputes in backward.

    Example:
        >>> from torch.utils.checkpoint import checkpoint
        >>> layer = nn.Linear(2, 2)
        >>> x = torch.ones(1, 2, requires_grad=True)
        >>> with own_checkpoints() as sites:
        ...     checkpoint(layer, x, use_reentrant=False).sum().backward()
        ...     checkpoint_block(layer)
        ...     layer(x).sum().backward()
        >>> len(sites), sites[0].startswith("<doctest")
        (1, True)
    """
    from lightning_memopt.core import compat

    sites: list[str] = []

    def on_region() -> None:
        if compat.in_backward():
            return
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
            frame = frame.f_back
        callers = [frame, frame.f_back if frame is not None else None]
        if any(f is not None and (f.f_code is _checkpointed_forward.__code__ or _hf_layer_frame(f)) for f in callers):
            return
        sites.append(f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "unknown")

    with compat.checkpoint_regions(on_region):
        yield sites


def _hf_layer_frame(frame: Any) -> bool:
    """A frame of transformers' checkpointing layer forward (``modeling_layers.GradientCheckpointingLayer``)."""
    return frame.f_code.co_name == "forward_with_checkpointing" and "transformers" in frame.f_code.co_filename


def is_checkpointed(block: nn.Module) -> bool:
    """Whether ``block`` runs under activation checkpointing: wrapped by :func:`checkpoint_block`, or a Hugging
    Face ``GradientCheckpointingLayer`` with checkpointing switched on.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> checkpoint_block(layer); is_checkpointed(layer)
        True
    """
    return _FLAG in block.__dict__ or bool(getattr(block, "gradient_checkpointing", False))


def checkpoint_block(block: nn.Module, reentrant: bool = False) -> None:
    """Wrap ``block.forward`` in ``torch.utils.checkpoint`` (see the module docstring); idempotent.

    Example:
        >>> layer = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
        >>> checkpoint_block(layer)
        >>> layer(torch.ones(1, 2, requires_grad=True)).sum().backward()
        >>> uncheckpoint_block(layer); is_checkpointed(layer)
        False
    """
    if _FLAG in block.__dict__:
        block.__dict__[_FLAG] = {"reentrant": reentrant}
        return
    block.__dict__[_ORIGINAL] = block.__dict__.get("forward")
    block.__dict__[_FLAG] = {"reentrant": reentrant}
    block.forward = MethodType(_checkpointed_forward, block)


def uncheckpoint_block(block: nn.Module) -> None:
    """Restore the forward of a block wrapped by :func:`checkpoint_block` (no-op for other modules)."""
    if block.__dict__.pop(_FLAG, None) is not None:
        original = block.__dict__.pop(_ORIGINAL)
        block.__dict__.pop("forward", None)
        if original is not None:
            block.forward = original


def _without_cache(original: Any, args: tuple, kwargs: dict) -> "tuple[tuple, dict]":
    """``args``/``kwargs`` with every KV-cache argument set to ``None`` and ``use_cache`` off, positional ones too
    (transformers' GPT-2 passes its cache positionally): a recomputation must not write the cache a second time."""
    try:
        bound = inspect.signature(original).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):  # no readable signature: keyword arguments only
        bound = None
    if bound is not None:
        for key in (*_CACHE_KWARGS, "use_cache"):
            if bound.arguments.get(key) is not None and key in bound.arguments:
                bound.arguments[key] = False if key == "use_cache" else None
        args, kwargs = bound.args, dict(bound.kwargs)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    for key in _CACHE_KWARGS:
        if kwargs.get(key) is not None:
            kwargs[key] = None
    return args, kwargs


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    original = self.__dict__[_ORIGINAL] or MethodType(type(self).forward, self)
    if not (self.training and torch.is_grad_enabled()):
        return original(*args, **kwargs)
    args, kwargs = _without_cache(original, args, kwargs)
    if self.__dict__[_FLAG]["reentrant"]:
        return checkpoint(lambda *a: original(*a, **kwargs), *args, use_reentrant=True)
    zero3 = any(hasattr(p, "ds_id") for p in self.parameters())
    return checkpoint(
        original, *args, use_reentrant=False, determinism_check="none" if zero3 else "default", **kwargs
    )


def _matcher(module: nn.Module, policy: Any) -> Callable[[nn.Module], bool]:
    if isinstance(policy, (type, str)):
        policy = {policy}
    if callable(policy):
        return lambda sub: bool(policy(sub))
    if not isinstance(policy, Iterable):
        raise TypeError(
            "Expected the policy to be 'auto', a class, a class name, a set of those or a callable, got"
            f" {type(policy).__name__}. Fix: e.g. policy={{'LlamaDecoderLayer'}}."
        )
    items = list(policy)
    bad = [p for p in items if not isinstance(p, (str, type))]
    if bad or not items:
        raise TypeError(f"Expected class names or classes in the policy, got {items!r}. Fix: e.g. {{'MyBlock'}}.")
    present = {type(sub).__name__ for sub in module.modules()}
    unknown = sorted(p for p in items if isinstance(p, str) and p not in present)
    if unknown:
        raise ValueError(
            f"Expected class names of submodules of {type(module).__name__}, got unknown {unknown}. Fix: use"
            f" one of {sorted(present)[:20]}."
        )
    names = {p for p in items if isinstance(p, str)}
    classes = tuple(p for p in items if isinstance(p, type))
    return lambda sub: type(sub).__name__ in names or isinstance(sub, classes)


def _outermost(names: list[str]) -> list[str]:
    kept: list[str] = []
    for name in names:  # named_modules() is pre-order: a parent comes before its children
        if not any(name.startswith(parent + ".") for parent in kept):
            kept.append(name)
    return kept
