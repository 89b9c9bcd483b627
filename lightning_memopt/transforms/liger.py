"""Liger-Kernel's Triton kernels (RMSNorm, RoPE, SwiGLU, (fused linear) cross-entropy) on a model instance.

Hugging Face models are patched by Liger's own per-architecture function (``MODEL_TYPE_TO_APPLY_LIGER_FN``)
with ``model=`` the instance. Those functions also overwrite names of the ``transformers`` modeling module
(the RMSNorm/MLP classes, ``apply_rotary_pos_emb``) and ``torch.nn.functional.cross_entropy`` process-wide.
Here every such global change is undone right after the call and, where the patched instance needs it at run
time (the RoPE function read by its attention's ``forward``), re-bound on that instance only; see
``docs/transforms.md``. Plain modules get Liger's RMSNorm for ``torch.nn.RMSNorm``; a LightningModule computes
its loss with :func:`fused_linear_cross_entropy`. Under ZeRO-3 the ``lm_head`` weight is gathered around the
fused loss (Liger-Kernel #767).
"""

import inspect
import sys
import types
from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
from lightning_utilities.core.rank_zero import WarningCache
from torch import Tensor, nn

from lightning_memopt import _imports
from lightning_memopt.transforms._applied import _record
from lightning_memopt.transforms.attention import _hf_models

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
    _imports.requires(_imports._LIGER_KERNEL_AVAILABLE, "Liger kernels", None)
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


def fused_linear_cross_entropy(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int = 1024,
) -> Tensor:
    """Cross-entropy of ``hidden @ lm_head_weight.T (+ bias)`` against ``labels``, logits never all in memory.

    On CUDA this is Liger's fused kernel (Hsu et al. 2024, "Liger Kernel", section 3.2); elsewhere a chunked
    PyTorch version of the same method (logits of ``chunk_size`` rows at a time, gradients computed in
    forward), so the same LightningModule runs on CPU. Under DeepSpeed ZeRO-3 (the weight carries ``ds_id``)
    the weight and bias are gathered for the call unless DeepSpeed already gathered them (as it does when they
    are read through their module inside the engine's forward, e.g. in a LightningModule's ``training_step``).
    Labels are not shifted: shift them for causal LM.

    Args:
        hidden: ``(..., hidden_size)`` final hidden states.
        lm_head_weight: ``(vocab, hidden_size)`` output projection.
        labels: ``(...)`` target ids, ``ignore_index`` where no loss is taken.
        bias: optional ``(vocab,)`` output bias.
        ignore_index: label id that is ignored.
        reduction: ``"mean"`` (over non-ignored tokens) or ``"sum"``.
        chunk_size: rows per chunk in the PyTorch version.

    Example:
        >>> import torch
        >>> h, w = torch.randn(6, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
        >>> y = torch.tensor([1, 2, 3, -100, 5, 6])
        >>> loss = fused_linear_cross_entropy(h, w, y)
        >>> torch.allclose(loss, torch.nn.functional.cross_entropy(h @ w.T, y))
        True
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"Expected reduction 'mean' or 'sum', got {reduction!r}.")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"Expected labels of shape {tuple(hidden.shape[:-1])} (hidden without its last dim), got"
            f" {tuple(labels.shape)}. Fix: shift/flatten hidden and labels alike."
        )
    hidden2d, labels1d = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    params = _partitioned([lm_head_weight, bias])
    if params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return _flce(hidden2d, lm_head_weight, labels1d, bias, ignore_index, reduction, chunk_size)
    return _flce(hidden2d, lm_head_weight, labels1d, bias, ignore_index, reduction, chunk_size)


def _flce(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    reduction: str,
    chunk: int,
) -> Tensor:
    if hidden.is_cuda and _imports._LIGER_KERNEL_AVAILABLE:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction
        )
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, bias, ignore_index, reduction, chunk)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Linear + cross-entropy by row chunks, gradients computed in forward (as Liger's kernel does)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        bias: Tensor | None,
        ignore_index: int,
        reduction: str,
        chunk: int,
    ) -> Tensor:
        valid = labels != ignore_index
        denominator = (
            valid.sum().clamp(min=1) if reduction == "mean" else torch.ones((), device=hidden.device)
        )
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
        for start in range(0, hidden.shape[0], chunk):
            h, y, ok = (
                hidden[start : start + chunk],
                labels[start : start + chunk],
                valid[start : start + chunk],
            )
            logits = (h @ weight.T + (bias if bias is not None else 0)).float()
            log_probs = torch.log_softmax(logits, dim=-1)
            target = y.clamp(min=0).unsqueeze(1)
            loss += -(log_probs.gather(1, target).squeeze(1) * ok).sum()
            grad_logits = log_probs.exp()
            grad_logits.scatter_add_(1, target, -torch.ones_like(target, dtype=grad_logits.dtype))
            grad_logits *= ok.unsqueeze(1) / denominator
            grad_hidden[start : start + chunk] = (grad_logits @ weight.float()).to(hidden.dtype)
            grad_weight += grad_logits.T @ h.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return (loss / denominator).to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_bias = ctx.grad_bias * grad_output if ctx.grad_bias is not None else None
        return grad_hidden * grad_output, grad_weight * grad_output, None, grad_bias, None, None, None


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


def _partitioned(params: list[Tensor | None]) -> list[Tensor]:
    """The ZeRO-3 parameters among ``params`` that are not gathered now.

    Inside a DeepSpeed engine's forward, reading a parameter through its module already gathers it
    (DeepSpeed's external-parameter getter): those are left to DeepSpeed, which would refuse a second owner.
    """
    return [
        p for p in params if p is not None and hasattr(p, "ds_id") and p.ds_status.name == "NOT_AVAILABLE"
    ]


# --- keeping Liger's process-wide patches off other models -------------------------------------------------


def _call_isolated(apply_fn: Callable, model: nn.Module, kwargs: dict[str, bool]) -> list[str]:
    """Run Liger's ``apply_fn`` on ``model``, then undo its module-level changes for every other model.

    Changed module globals are restored; functions and class attributes the instance needs at run time are
    re-bound on its submodules only. Returns the changes that stay process-wide (none for the common models).
    """
    watched = _watched_modules()
    before = {name: dict(vars(mod)) for name, mod in watched.items()}
    classes_before = {cls: dict(vars(cls)) for cls in _classes(watched)}
    ce_before = torch.nn.functional.cross_entropy
    try:
        apply_fn(model=model, **kwargs)
    except (AssertionError, NotImplementedError, ValueError) as error:
        for name, mod in watched.items():  # undo whatever it changed before failing
            vars(mod).update({k: v for k, v in before[name].items() if vars(mod).get(k) is not v})
        for cls, attrs in classes_before.items():
            for key, old in attrs.items():
                if vars(cls).get(key) is not old:
                    setattr(cls, key, old)
        torch.nn.functional.cross_entropy = ce_before
        raise ValueError(
            f"Expected Liger's {apply_fn.__name__} to accept {kwargs}, got: {error}. Fix: switch that kernel"
            " off."
        ) from error
    process_wide: list[str] = []
    for name, mod in watched.items():
        namespace = vars(mod)
        changed = {k: v for k, v in namespace.items() if k in before[name] and before[name][k] is not v}
        for key, new in changed.items():
            namespace[key] = before[name][key]
            if isinstance(new, type) or key in ("logger",):
                # a class only matters when models are built: Liger patched the instance itself
                continue
            if not _localize_global(model, namespace, key, new):
                namespace[key] = new
                process_wide.append(f"{name}.{key}")
    for cls, attrs in classes_before.items():
        for key, old in attrs.items():
            new = vars(cls).get(key)
            if new is not old:
                setattr(cls, key, old)
                for sub in model.modules():
                    if isinstance(sub, cls) and key not in sub.__dict__:
                        sub.__dict__[key] = new.__get__(sub, type(sub)) if hasattr(new, "__get__") else new
    new_modules = sorted(set(_watched_modules()) - set(watched))
    process_wide += [f"{name} (imported by Liger, patched as Liger left it)" for name in new_modules]
    if torch.nn.functional.cross_entropy is not ce_before:
        liger_ce = torch.nn.functional.cross_entropy
        torch.nn.functional.cross_entropy = ce_before
        if not _localize_cross_entropy(model, liger_ce):
            torch.nn.functional.cross_entropy = liger_ce
            process_wide.append("torch.nn.functional.cross_entropy")
    if process_wide:
        _warning_cache.warn(
            f"Liger's patches {process_wide} stay process-wide: they also apply to other models."
        )
    return process_wide


def _watched_modules() -> dict[str, types.ModuleType]:
    """Namespaces Liger's functions assign to: transformers' modeling modules and ``torch.nn``.

    Some vision patches set ``modeling_x.nn.LayerNorm``, which is ``torch.nn.LayerNorm``.
    """
    watched = {
        name: mod
        for name, mod in list(sys.modules.items())
        if mod is not None
        and (name.startswith("transformers.models.") or name == "transformers.loss.loss_utils")
    }
    return {**watched, "torch.nn": torch.nn}


def _classes(watched: dict[str, types.ModuleType]) -> list[type]:
    return [
        obj
        for name, mod in watched.items()
        for obj in vars(mod).values()
        if isinstance(obj, type) and obj.__module__ == name
    ]


def _uses(code: types.CodeType, name: str) -> bool:
    return name in code.co_names or any(
        isinstance(c, types.CodeType) and _uses(c, name) for c in code.co_consts
    )


def _with_globals(fn: types.FunctionType, overrides: dict[str, Any]) -> types.FunctionType:
    new = types.FunctionType(
        fn.__code__, {**fn.__globals__, **overrides}, fn.__name__, fn.__defaults__, fn.__closure__
    )
    new.__kwdefaults__, new.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    new.__wrapped__ = fn  # type: ignore[attr-defined]
    return new


def _localize_global(model: nn.Module, namespace: dict, key: str, new: Any) -> bool:
    """Re-bind the methods of ``model``'s submodules that read global ``key`` so they see ``key -> new``.

    Returns False when a plain function of the module reads it (then it cannot be made instance-local).
    """
    for value in namespace.values():
        if isinstance(value, types.FunctionType) and _localized(value, namespace, key, new) is not None:
            return False
    for sub in model.modules():
        for cls in type(sub).__mro__:
            for attr, fn in vars(cls).items():
                if isinstance(fn, types.FunctionType) and attr not in sub.__dict__:
                    local = _localized(fn, namespace, key, new)
                    if local is not None:
                        sub.__dict__[attr] = MethodType(local, sub)
    return True


def _localized(fn: types.FunctionType, namespace: dict, key: str, new: Any) -> types.FunctionType | None:
    """A copy of ``fn`` (and of its decorators) reading ``key -> new``; None if ``fn`` doesn't read it."""
    if fn.__globals__ is namespace and _uses(fn.__code__, key):
        return _with_globals(fn, {key: new})
    for i, cell in enumerate(fn.__closure__ or ()):
        try:
            inner = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(inner, types.FunctionType) and inner is not fn:
            local = _localized(inner, namespace, key, new)
            if local is not None:
                cells = list(fn.__closure__)
                cells[i] = types.CellType(local)
                copy = types.FunctionType(
                    fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells)
                )
                copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
                copy.__dict__.update({**fn.__dict__, "__wrapped__": local})
                return copy
    return None


def _localize_cross_entropy(model: nn.Module, liger_ce: Callable) -> bool:
    """Give ``model`` a loss function whose cross-entropy is Liger's, leaving ``torch`` untouched."""
    loss_fn = getattr(model, "loss_function", None)
    if not isinstance(loss_fn, types.FunctionType) or not _uses(loss_fn.__code__, "fixed_cross_entropy"):
        return False
    fixed = loss_fn.__globals__["fixed_cross_entropy"]
    shim = types.SimpleNamespace(functional=types.SimpleNamespace(cross_entropy=liger_ce))
    model.loss_function = _with_globals(loss_fn, {"fixed_cross_entropy": _with_globals(fixed, {"nn": shim})})
    return True
