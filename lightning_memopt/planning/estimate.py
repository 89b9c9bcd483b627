"""``estimate_memory``: the per-rank memory of a training step, with the transforms a user asks about applied first.

The predictor traces a model as it is (:func:`~lightning_memopt.predictor.predict`). Asked what Liger kernels or LoRA
adapters would do to a model given as a config or a preset, this builds the model from the config (meta device),
applies them the way the run would (``apply_liger``; PEFT's ``get_peft_model``) and predicts that model. A module
the user passes is predicted as it is: its kernels and adapters are what it has.
"""

import warnings
from typing import Any

from lightning_memopt.predictor.api import predict
from lightning_memopt.predictor.read.sources import Source, config_of, from_config, resolve_source
from lightning_memopt.predictor.report.estimate import MemoryEstimate
from lightning_memopt.transforms.liger import DEFAULT_KERNELS
from lightning_memopt.transforms.liger import KERNELS as LIGER_KERNELS


def estimate_memory(
    model: Any,
    *,
    liger: "bool | dict[str, bool]" = False,
    lora_rank: "int | None" = None,
    lora_targets: "str | list[str] | None" = None,
    **kwargs: Any,
) -> MemoryEstimate:
    """Predict one rank's peak memory of a training step (see :func:`~lightning_memopt.predictor.predict` for every
    other argument), after applying the transforms asked for to a model built from ``model``'s config.

    Args:
        model: a config (object, dict, ``config.json``), a preset, an ``nn.Module`` or a parameter count.
        liger: Liger-Kernel's kernels (``True``: its defaults; or a dict of switches among :data:`LIGER_KERNELS`),
            applied as ``apply_liger`` applies them. For an ``nn.Module`` it must already be patched.
        lora_rank: LoRA adapters of this rank on a frozen base (PEFT's ``LoraConfig(r=lora_rank)``).
        lora_targets: the modules that get adapters: names (``["q_proj", "v_proj"]``), ``"all-linear"``, or
            ``None`` for PEFT's default for the architecture.
        **kwargs: the arguments of :func:`~lightning_memopt.predictor.predict`.

    Raises:
        ValueError: a transform asked for a parameter count, or for a module that does not carry it, with the fix.

    Example:
        >>> full = estimate_memory("llama-3-8b", seq_len=1024)
        >>> lora = estimate_memory("llama-3-8b", seq_len=1024, lora_rank=16)
        >>> lora.optimizer_states < full.optimizer_states / 100
        True
    """
    switches = _liger_switches(liger)
    if lora_rank is None and lora_targets is not None:
        raise ValueError(
            f"Expected `lora_targets` only with `lora_rank`, got lora_targets={lora_targets!r} alone."
            " Fix: pass lora_rank=16 (say), or drop lora_targets."
        )
    if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise ValueError(f"Expected `lora_rank` to be a positive int, got {lora_rank!r}. Fix: e.g. lora_rank=16.")
    if not switches and lora_rank is None:
        return predict(model, **kwargs)
    estimate = predict(_prepared(model, switches, lora_rank, lora_targets), **kwargs)
    details = dict(estimate.details or {}, liger=switches or False, lora_rank=lora_rank, lora_targets=lora_targets)
    return MemoryEstimate(**{**estimate.to_dict(), "details": details})


def _liger_switches(liger: Any) -> "dict[str, bool]":
    if liger is False or liger is None:
        return {}
    if liger is True:
        return dict(DEFAULT_KERNELS)
    if isinstance(liger, dict):
        unknown = sorted(set(liger) - set(LIGER_KERNELS))
        if unknown:
            raise ValueError(f"Expected Liger switches among {LIGER_KERNELS}, got unknown {unknown}. Fix: drop them.")
        return {k: bool(liger.get(k, False)) for k in LIGER_KERNELS}
    raise TypeError(f"Expected `liger` to be a bool or a dict of kernel switches, got {liger!r}. Fix: liger=True.")


def _prepared(model: Any, switches: "dict[str, bool]", lora_rank: "int | None", targets: Any) -> Source:
    """The model with the transforms applied: built anew from its config (kept, like any built model)."""
    config = config_of(model)
    if config is None:
        source = resolve_source(model)
        if source.module is None:
            raise ValueError(
                "Expected a model with layers to apply Liger kernels or LoRA adapters to, got a parameter count."
                " Fix: pass its config or a preset."
            )
        return _as_is(source, switches, lora_rank)

    def prepare(module: Any) -> Any:
        if lora_rank is not None:
            module = with_lora(module, lora_rank, targets)
        if switches:
            from lightning_memopt.transforms.liger import apply_liger

            apply_liger(module, allow_cpu=True, **switches)
        return module

    label = f"lora={lora_rank}:{targets}|liger={sorted(k for k, v in switches.items() if v)}"
    return from_config(config, prepare=prepare, label=label)


def _as_is(source: Source, switches: "dict[str, bool]", lora_rank: "int | None") -> Source:
    """A module the user passed: predicted as it is, so it must carry what was asked for."""
    from lightning_memopt.transforms import applied_transforms

    name = type(source.module).__name__
    if lora_rank is not None:
        raise ValueError(
            f"Expected a config or a preset to add LoRA adapters to, got the module {name}. Fix: pass the model with"
            " its adapters (peft's get_peft_model(model, LoraConfig(...))): its frozen base and adapters are read"
            " as they are."
        )
    if switches and not applied_transforms(source.module).get("liger"):
        raise ValueError(
            f"Expected a module patched with Liger kernels for liger={switches}, got {name} without them. Fix:"
            " lightning_memopt.transforms.apply_liger(model) first (the module is predicted as it is), or pass"
            " its config."
        )
    return source


def with_lora(module: Any, rank: int, targets: Any) -> Any:
    """``module`` with PEFT LoRA adapters of ``rank`` on ``targets`` (PEFT's default for the architecture when
    ``None``); the base is frozen, as ``get_peft_model`` leaves it."""
    from lightning_memopt._imports import _PEFT_AVAILABLE, requires

    requires(_PEFT_AVAILABLE, "LoRA estimates (lora_rank)", "peft")
    from peft import LoraConfig, get_peft_model

    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(module, LoraConfig(r=rank, target_modules=targets))
    except ValueError as err:
        raise ValueError(
            f"Expected LoRA target modules PEFT can place on {type(module).__name__}, got {targets!r}: {err}"
            " Fix: name them, e.g. lora_targets=['q_proj', 'v_proj'], or lora_targets='all-linear'."
        ) from None
