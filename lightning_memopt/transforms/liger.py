"""Liger-Kernel's Triton kernels (RMSNorm, RoPE, SwiGLU, (fused linear) cross-entropy) on a model instance.

Hugging Face models are patched by Liger's own per-architecture function (``MODEL_TYPE_TO_APPLY_LIGER_FN``)
with ``model=`` the instance. Those functions also overwrite names of the ``transformers`` modeling module
(the RMSNorm/MLP classes, ``apply_rotary_pos_emb``) and ``torch.nn.functional.cross_entropy`` process-wide.
Here every such global change is undone right after the call and given to the patched instance only: its layers
run their ``forward`` with Liger's names in place (the RoPE function its attention reads, the cross-entropy its
loss uses); see ``docs/transforms.md``. Plain modules get Liger's RMSNorm for ``torch.nn.RMSNorm``; a
LightningModule computes its loss with :func:`~lightning_memopt.transforms.fused_linear_cross_entropy`. Under
ZeRO-3 the ``lm_head`` weight is gathered around the fused loss (Liger-Kernel #767).
"""

import functools
import inspect
import sys
import types
from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
from lightning_utilities.core.rank_zero import WarningCache
from torch import nn

from lightning_memopt import _imports
from lightning_memopt.transforms._applied import _record
from lightning_memopt.transforms.attention import _hf_models
from lightning_memopt.transforms.fused_cross_entropy import _partitioned

KERNELS = ("rms_norm", "rope", "swiglu", "cross_entropy", "fused_linear_cross_entropy")
#: The kernel switches of :func:`apply_liger` and their defaults.
DEFAULT_KERNELS = {
    "rms_norm": True,
    "rope": True,
    "swiglu": True,
    "cross_entropy": False,
    "fused_linear_cross_entropy": True,
}
_warning_cache = WarningCache()


def apply_liger(
    module: nn.Module,
    *,
    rms_norm: bool = True,
    rope: bool = True,
    swiglu: bool = True,
    cross_entropy: bool = False,
    fused_linear_cross_entropy: bool = True,
    strict: bool = True,
    device: torch.device | str | None = None,
    allow_cpu: bool = False,
) -> nn.Module:
    """Patch the Hugging Face models and ``torch.nn.RMSNorm`` layers in ``module`` with Liger kernels.

    What was patched is recorded in ``applied_transforms(module)["liger"]``: per model its ``model_type``, the
    ``kernels`` applied and the ``not_supported`` ones Liger's function for that architecture has no switch
    for; ``rms_norm_modules`` lists plain ``nn.RMSNorm`` layers patched.

    Args:
        module: the model, modified in place.
        rms_norm: Liger RMSNorm.
        rope: Liger rotary embedding.
        swiglu: Liger SwiGLU MLP.
        cross_entropy: Liger cross-entropy on the logits (exclusive with ``fused_linear_cross_entropy``).
        fused_linear_cross_entropy: fuse ``lm_head`` and cross-entropy in training (logits are not returned).
        strict: raise for an unsupported model type (``False``: warn once on rank zero and skip it).
        device: where the model will run; Liger's Triton kernels need CUDA (default: the parameters' device if
            it is CUDA, else CUDA when available).
        allow_cpu: patch although the device is not CUDA (for tests of the patching: running then fails).

    Raises:
        ValueError: both cross-entropy switches, a non-CUDA device without ``allow_cpu``, an unsupported model
            type or nothing to patch (with ``strict``).
        ModuleNotFoundError: liger-kernel is not installed.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8))
        >>> _ = apply_liger(model, allow_cpu=True)
        >>> from lightning_memopt.transforms import applied_transforms
        >>> applied_transforms(model)["liger"]["rms_norm_modules"]
        ['1']
    """
    switches = {
        "rms_norm": rms_norm,
        "rope": rope,
        "swiglu": swiglu,
        "cross_entropy": cross_entropy,
        "fused_linear_cross_entropy": fused_linear_cross_entropy,
    }
    _validate(switches, device, allow_cpu, module)
    _imports.requires(_imports._LIGER_KERNEL_AVAILABLE, "Liger kernels", "liger")
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    record: dict[str, Any] = {"models": [], "rms_norm_modules": [], "skipped": [], "process_wide": []}
    hf_models = _hf_models(module)
    for model in hf_models:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
        if apply_fn is None:
            message = (
                f"Expected a model type Liger-Kernel supports, got {model_type!r} ({type(model).__name__})."
                f" Supported: {sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)}."
            )
            if strict:
                raise ValueError(
                    message + " Fix: drop the Liger setting, or pass strict=False to skip this model."
                )
            _warning_cache.warn(message + " It is left unpatched (strict=False).")
            record["skipped"].append(model_type)
            continue
        accepted = set(inspect.signature(apply_fn).parameters)
        kwargs = {k: v for k, v in switches.items() if k in accepted}
        record["process_wide"] += _call_isolated(apply_fn, model, kwargs)
        if kwargs.get("fused_linear_cross_entropy") and "forward" in model.__dict__:
            model.forward = MethodType(_zero3_gathering_forward(model.__dict__["forward"]), model)
        record["models"].append(
            {
                "model_type": model_type,
                "kernels": sorted(k for k, v in kwargs.items() if v),
                "not_supported": sorted(k for k, v in switches.items() if v and k not in accepted),
            }
        )
    if rms_norm:
        record["rms_norm_modules"] = _patch_plain_rms_norms(module)
    if not record["models"] and not record["rms_norm_modules"] and strict:
        raise ValueError(
            f"Expected a Hugging Face model Liger supports or an nn.RMSNorm inside {type(module).__name__},"
            " got neither: there is nothing to patch. Fix: compute the loss with"
            " `lightning_memopt.transforms.fused_linear_cross_entropy` and drop the Liger setting, or pass"
            " strict=False."
        )
    _record(module, "liger", record)
    return module


def _validate(switches: dict[str, bool], device: Any, allow_cpu: bool, module: nn.Module) -> None:
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise TypeError(f"Expected `{name}` to be a bool, got {value!r}.")
    if switches["cross_entropy"] and switches["fused_linear_cross_entropy"]:
        raise ValueError(
            "Expected at most one of `cross_entropy` and `fused_linear_cross_entropy`, got both True. Fix:"
            " keep fused_linear_cross_entropy=True (it never materialises the logits) and set"
            " cross_entropy=False."
        )
    if device is None:
        on_cuda = any(p.is_cuda for p in module.parameters())
        device = torch.device("cuda") if on_cuda or torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type != "cuda" and not allow_cpu:
        raise ValueError(
            f"Expected a CUDA device for Liger's Triton kernels, got {device}. Fix: run on a GPU, drop the"
            " Liger setting on CPU, or pass allow_cpu=True to only patch (the patched model then fails to"
            " run on CPU)."
        )


def _patch_plain_rms_norms(module: nn.Module) -> list[str]:
    from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module

    names = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.RMSNorm) and sub.weight is not None and "forward" not in sub.__dict__:
            eps = sub.eps if sub.eps is not None else torch.finfo(sub.weight.dtype).eps
            _patch_rms_norm_module(sub, eps=eps)
            names.append(name)
    return names


def _zero3_gathering_forward(liger_forward: Callable) -> Callable:
    """Gather ``lm_head``'s ZeRO-3 partitions around Liger's training forward (it reads the weight)."""

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        head = self.get_output_embeddings()
        params = _partitioned(list(head.parameters())) if head is not None else []
        has_labels = kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None
        if not (params and self.training and has_labels):
            return liger_forward(*args, **kwargs)
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return liger_forward(*args, **kwargs)

    return forward


# --- keeping Liger's process-wide patches off other models -------------------------------------------------


def _call_isolated(apply_fn: Callable, model: nn.Module, kwargs: dict[str, bool]) -> list[str]:
    """Run Liger's ``apply_fn`` on ``model`` and keep its module-level changes to that instance.

    The namespaces Liger assigns to (transformers' modeling modules, ``torch.nn.functional``) and their classes are
    snapshotted before the call and restored after it. The functions it changed are then given to the patched
    instance only: each of its submodules whose class comes from a changed modeling module (the top-level model for
    ``torch.nn.functional``) runs its ``forward`` with Liger's values in place (:func:`_with_names`; a block that
    activation checkpointing recomputes sees them too). A changed class is not re-bound (Liger patched the existing
    layers itself; a class matters when a model is built); a changed class attribute is bound on the instances.
    Returns what stays process-wide: modules Liger imported for the first time.
    """
    namespaces = _namespaces()
    before = {name: dict(vars(namespace)) for name, namespace in namespaces.items()}
    classes = {cls: dict(vars(cls)) for cls in _classes(namespaces)}
    try:
        apply_fn(model=model, **kwargs)
    except (AssertionError, NotImplementedError, ValueError) as error:
        _restore(namespaces, before, classes)
        raise ValueError(
            f"Expected Liger's {apply_fn.__name__} to accept {kwargs}, got: {error}. Fix: switch that kernel off."
        ) from error
    changed, class_changes = _restore(namespaces, before, classes)
    overrides: dict[nn.Module, list[tuple[Any, str, Any]]] = {}
    for (name, key), new in changed.items():
        if isinstance(new, type) or key == "logger":
            continue
        owners = [model] if name.startswith("torch.") else [m for m in model.modules() if type(m).__module__ == name]
        for owner in owners:
            overrides.setdefault(owner, []).append((namespaces[name], key, new))
    for owner, names in overrides.items():
        forward = owner.forward
        owner.forward = MethodType(_with_names(getattr(forward, "__func__", forward), names), owner)
    for cls, key, new in class_changes:
        for sub in model.modules():
            if isinstance(sub, cls) and key not in sub.__dict__:
                sub.__dict__[key] = new.__get__(sub, type(sub)) if hasattr(new, "__get__") else new
    process_wide = [f"{name} (imported by Liger, patched as Liger left it)"
                    for name in sorted(set(_namespaces()) - set(namespaces))]  # fmt: skip
    if process_wide:
        _warning_cache.warn(f"Liger's patches {process_wide} stay process-wide: they also apply to other models.")
    return process_wide


def _with_names(forward: Callable, names: list[tuple[Any, str, Any]]) -> Callable:
    """``forward`` (unbound) run with ``setattr(namespace, key, value)`` for each of ``names`` during the call and
    the previous values put back after it. Module-level names are process-wide while a call runs: another model run
    at the same moment in another thread would see them."""

    @functools.wraps(forward)
    def run(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        saved = [(namespace, key, getattr(namespace, key)) for namespace, key, _ in names]
        for namespace, key, value in names:
            setattr(namespace, key, value)
        try:
            return forward(self, *args, **kwargs)
        finally:
            for namespace, key, value in reversed(saved):
                setattr(namespace, key, value)

    return run


def _restore(
    namespaces: dict[str, types.ModuleType], before: dict[str, dict], classes: dict[type, dict]
) -> tuple[dict[tuple[str, str], Any], list[tuple[type, str, Any]]]:
    """Put back every name and class attribute that changed since the snapshot; return what the changes were."""
    changed = {}
    for name, namespace in namespaces.items():
        now = vars(namespace)
        for key, old in before[name].items():
            if now.get(key) is not old:
                changed[(name, key)] = now.get(key)
                setattr(namespace, key, old)
    class_changes = []
    for cls, attrs in classes.items():
        for key, old in attrs.items():
            new = vars(cls).get(key)
            if new is not old:
                class_changes.append((cls, key, new))
                setattr(cls, key, old)
    return changed, class_changes


def _namespaces() -> dict[str, types.ModuleType]:
    """The modules Liger's functions assign to: transformers' modeling modules and loss utilities, ``torch.nn`` (some
    vision patches set ``modeling_x.nn.LayerNorm``) and ``torch.nn.functional`` (its cross-entropy)."""
    watched = {
        name: mod
        for name, mod in list(sys.modules.items())
        if mod is not None and (name.startswith("transformers.models.") or name == "transformers.loss.loss_utils")
    }
    return {**watched, "torch.nn": torch.nn, "torch.nn.functional": torch.nn.functional}


def _classes(namespaces: dict[str, types.ModuleType]) -> list[type]:
    return [obj for name, mod in namespaces.items() for obj in vars(mod).values()
            if isinstance(obj, type) and obj.__module__ == name]  # fmt: skip
