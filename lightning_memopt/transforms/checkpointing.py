"""Activation checkpointing of repeated blocks, for Hugging Face models and plain modules alike.

A checkpointed block keeps only its inputs during the forward pass and recomputes its activations in backward
(Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost", section 3): on an L-block stack the saved
activations drop from about L blocks' worth to the block inputs plus one block recomputed at a time.

The block's ``forward`` is replaced on the instance (module names, ``state_dict`` keys and forward hooks are
unchanged, as in transformers' ``GradientCheckpointingLayer``), so DeepSpeed ZeRO-3's parameter-gathering
hooks of the block's children run again during the recomputation. Under ZeRO-3 (parameters carrying ``ds_id``)
the recomputation's metadata check is switched off (``determinism_check="none"``): the recorded shapes of
partitioned parameters differ from the gathered ones, which is the ``CheckpointError`` of transformers #47254
/ DeepSpeed #4332.
"""

import math
from collections.abc import Callable, Iterable
from types import MethodType
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_memopt.transforms._applied import _forget, _record

Policy = str | type | Iterable[str | type] | Callable[[nn.Module], bool]

_FLAG = "_memopt_checkpointed"
# keyword arguments of Hugging Face layers that write a KV cache: a recomputation would write it twice
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def blocks_to_checkpoint(module: nn.Module, policy: Policy = "auto") -> list[str]:
    """List the blocks ``policy`` selects in ``module``, in forward order (outermost matches only).

    Args:
        module: the model (a LightningModule works: its module tree is searched).
        policy: ``"auto"`` (the classes named in Hugging Face ``_no_split_modules``, else the largest
            ``nn.ModuleList`` whose children all share one class), a class, a class name, a set of those, or a
            callable ``module -> bool``.

    Raises:
        ValueError: a class name that no submodule has, or a policy that matches no module.
        TypeError: a policy of another type.

    Example:
        >>> from torch import nn
        >>> stack = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
        >>> blocks_to_checkpoint(stack)
        ['1.0', '1.1', '1.2']
        >>> blocks_to_checkpoint(stack, {"Linear"})
        ['0', '1.0', '1.1', '1.2']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected an nn.Module, got {type(module).__name__}. Fix: pass the model.")
    if isinstance(policy, str) and policy == "auto":
        names = _auto_blocks(module)
        if not names:
            raise ValueError(
                f"Expected `policy='auto'` to find repeated blocks in {type(module).__name__}, got none (no"
                " Hugging Face `_no_split_modules` and no `nn.ModuleList` of same-class blocks). Fix: pass"
                f" the block classes, e.g. `policy={{'MyBlock'}}`, or a callable."
            )
        return names
    match = _matcher(module, policy)
    names = _outermost([name for name, sub in module.named_modules() if name and match(sub)])
    if not names:
        raise ValueError(
            f"Expected the checkpointing policy {policy!r} to match a submodule of {type(module).__name__},"
            f" got no match. Fix: name the repeated block class, e.g. `policy={{'DecoderLayer'}}`, or use"
            " 'auto'."
        )
    return names


def apply_activation_checkpointing(
    module: nn.Module,
    policy: Policy = "auto",
    *,
    fraction: float | None = None,
    every_k: int | None = None,
    reentrant: bool = False,
) -> nn.Module:
    """Checkpoint the blocks of ``module`` that ``policy`` selects, in place; return ``module``.

    Applying again replaces an earlier application (blocks no longer selected are restored). What was wrapped
    is
    recorded: ``applied_transforms(module)["activation_checkpointing"]``.

    Args:
        module: the model (Hugging Face, plain ``nn.Module`` or LightningModule).
        policy: which blocks, see :func:`blocks_to_checkpoint`.
        fraction: checkpoint the first ``ceil(fraction * n)`` of the ``n`` candidate blocks, ``0 < fraction <=
            1``.
        every_k: checkpoint every ``every_k``-th candidate block (indices 0, k, 2k, ...), ``every_k >= 1``.
        reentrant: use the reentrant implementation (not recommended; keyword inputs are bound, not
            differentiated through).

    Raises:
        ValueError: a bad ``fraction``/``every_k``, both given, or a policy that selects nothing.
        TypeError: a policy of another type.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> stack = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(4)])
        >>> _ = apply_activation_checkpointing(stack, {"Sequential"}, fraction=0.5)
        >>> from lightning_memopt.transforms import applied_transforms
        >>> applied_transforms(stack)["activation_checkpointing"]["blocks"]
        ['0', '1']
        >>> stack(torch.randn(2, 4, requires_grad=True)).sum().backward()
    """
    _validate_selection(fraction, every_k)
    if not isinstance(reentrant, bool):
        raise TypeError(f"Expected `reentrant` to be a bool, got {reentrant!r}. Fix: pass True or False.")
    candidates = blocks_to_checkpoint(module, policy)
    if fraction is not None:
        chosen = candidates[: math.ceil(fraction * len(candidates) - 1e-9)]
    elif every_k is not None:
        chosen = candidates[::every_k]
    else:
        chosen = list(candidates)
    remove_activation_checkpointing(module)
    for name in chosen:
        _wrap(module.get_submodule(name), reentrant)
    _record(
        module,
        "activation_checkpointing",
        {
            "blocks": chosen,
            "candidates": len(candidates),
            "fraction": len(chosen) / len(candidates),
            "reentrant": reentrant,
        },
    )
    return module


def remove_activation_checkpointing(module: nn.Module) -> nn.Module:
    """Undo :func:`apply_activation_checkpointing` on every block of ``module``; return ``module``.

    Example:
        >>> from torch import nn
        >>> stack = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        >>> _ = remove_activation_checkpointing(apply_activation_checkpointing(stack))
        >>> "forward" in stack[0].__dict__
        False
    """
    for sub in module.modules():
        _unwrap(sub)
    _forget(module, "activation_checkpointing")
    return module


def _validate_selection(fraction: float | None, every_k: int | None) -> None:
    if fraction is not None and every_k is not None:
        raise ValueError(
            f"Expected at most one of `fraction` and `every_k`, got fraction={fraction} and"
            f" every_k={every_k}. Fix: pass only one."
        )
    if fraction is not None and (
        isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1
    ):
        raise ValueError(
            f"Expected `fraction` in (0, 1], got {fraction!r}. Fix: e.g. fraction=0.5 for half the blocks."
        )
    if every_k is not None and (isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1):
        raise ValueError(f"Expected `every_k` to be an int >= 1, got {every_k!r}. Fix: e.g. every_k=2.")


def _auto_blocks(module: nn.Module) -> list[str]:
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
        if isinstance(sub, nn.ModuleList) and len(sub) > len(best):
            classes = {type(child) for child in sub}
            if len(classes) == 1:
                prefix = f"{name}." if name else ""
                best = [f"{prefix}{i}" for i in range(len(sub))]
    return best


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
        raise TypeError(
            f"Expected class names or classes in the policy, got {items!r}. Fix: e.g. {{'MyBlock'}}."
        )
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


def _wrap(block: nn.Module, reentrant: bool) -> None:
    block.__dict__["_memopt_original_forward"] = block.__dict__.get("forward")
    block.__dict__[_FLAG] = {"reentrant": reentrant}
    block.forward = MethodType(_checkpointed_forward, block)


def _unwrap(block: nn.Module) -> None:
    """Restore the forward of a block wrapped by :func:`_wrap` (no-op for other modules)."""
    if block.__dict__.pop(_FLAG, None) is not None:
        original = block.__dict__.pop("_memopt_original_forward")
        block.__dict__.pop("forward", None)
        if original is not None:
            block.forward = original


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    original = self.__dict__["_memopt_original_forward"] or MethodType(type(self).forward, self)
    if not (self.training and torch.is_grad_enabled()):
        return original(*args, **kwargs)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    for key in _CACHE_KWARGS:
        if kwargs.get(key) is not None:
            kwargs[key] = None
    if self.__dict__[_FLAG]["reentrant"]:
        return checkpoint(lambda *a: original(*a, **kwargs), *args, use_reentrant=True)
    zero3 = any(hasattr(p, "ds_id") for p in self.parameters())
    return checkpoint(
        original, *args, use_reentrant=False, determinism_check="none" if zero3 else "default", **kwargs
    )
