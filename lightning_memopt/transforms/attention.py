"""Switch the attention implementation: FlashAttention-2, PyTorch SDPA or eager.

Eager attention materialises the ``s x s`` softmax probabilities per head and keeps them for backward;
FlashAttention (Dao et al. 2022, "FlashAttention", section 3.1) and PyTorch's SDPA kernels recompute them
blockwise, so the saved activations lose the ``O(s^2)`` term.

Hugging Face models are switched through their own ``set_attn_implementation``. ``nn.MultiheadAttention`` in
plain modules keeps its weights and module; its forward is routed through ``F.scaled_dot_product_attention``
(torch's own ``need_weights=False`` path), so it no longer returns attention weights.
"""

import sys
from types import MethodType
from typing import Any

import torch
from lightning_utilities.core.rank_zero import WarningCache
from torch import Tensor, nn

from lightning_memopt import _imports
from lightning_memopt.transforms._applied import _record

IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
_FLAG = "_memopt_sdpa"
_warning_cache = WarningCache()


def apply_attention(
    module: nn.Module,
    implementation: str = "auto",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Set the attention implementation of the Hugging Face models and ``nn.MultiheadAttention`` modules.

    ``"auto"`` picks ``flash_attention_2`` where flash-attn is installed, the model supports it, the device is
    CUDA and the dtype is fp16/bf16, else ``"sdpa"`` (``"eager"`` for a model without SDPA support). The
    resolved name is
    recorded: ``applied_transforms(module)["attention"]``.

    Args:
        module: the model, modified in place.
        implementation: one of ``"auto"``, ``"flash_attention_2"``, ``"sdpa"``, ``"eager"``.
        device: where the model will run (default: where its parameters are).
        dtype: the compute dtype (default: the parameters' floating dtype; pass ``torch.bfloat16`` for
            bf16-mixed).

    Raises:
        ValueError: an unknown name, ``flash_attention_2`` not on CUDA or not in fp16/bf16, on a plain
            ``nn.MultiheadAttention`` or on a model without support, or a module with nothing to switch.
        ModuleNotFoundError: ``flash_attention_2`` without flash-attn installed.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
        >>> x = torch.randn(1, 5, 8)
        >>> reference = mha(x, x, x)[0]
        >>> _ = apply_attention(mha, "sdpa")
        >>> out, weights = mha(x, x, x, need_weights=False)
        >>> torch.allclose(out, reference, atol=1e-6), weights
        (True, None)
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Expected the attention implementation to be one of {IMPLEMENTATIONS}, got {implementation!r}."
        )
    device, dtype = _target(module, device, dtype)
    hf_models = _hf_models(module)
    mhas = [m for m in module.modules() if isinstance(m, nn.MultiheadAttention)]
    if not hf_models and not mhas:
        raise ValueError(
            f"Expected a Hugging Face model or an nn.MultiheadAttention inside {type(module).__name__}, got"
            " neither, so there is no attention to switch. Fix: drop the attention setting, or call"
            " F.scaled_dot_product_attention in your own attention."
        )
    if implementation == "flash_attention_2":
        _check_flash(device, dtype)
        if mhas:
            raise ValueError(
                "Expected flash_attention_2 only for Hugging Face models, got nn.MultiheadAttention modules."
                " Fix: use 'sdpa', whose flash backend serves nn.MultiheadAttention."
            )
    resolved = set()
    for model in hf_models:
        name = _resolve_hf(model, implementation, device, dtype)
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise ValueError(
                f"Expected {type(model).__name__} to switch to {name!r} attention, got"
                f" {model.config._attn_implementation!r}: it cannot change attention after construction."
                f" Fix: pass `attn_implementation={name!r}` to `from_pretrained`/`from_config`."
            )
        resolved.add(name)
    for mha in mhas:
        _route_mha(mha, to_sdpa=implementation != "eager")
        resolved.add("eager" if implementation == "eager" else "sdpa")
    _record(module, "attention", resolved.pop() if len(resolved) == 1 else sorted(resolved))
    return module


def _target(module: nn.Module, device: Any, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    params = [p for p in module.parameters() if p.is_floating_point()]
    device = (
        torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    )
    dtype = dtype if dtype is not None else (params[0].dtype if params else torch.float32)
    return device, dtype


def _check_flash(device: torch.device, dtype: torch.dtype) -> None:
    _imports.requires(_imports._FLASH_ATTN_AVAILABLE, "attention 'flash_attention_2'", "flash")
    if device.type != "cuda":
        raise ValueError(
            f"Expected a CUDA device for flash_attention_2, got {device}. Fix: use 'sdpa' (its flash backend"
            " also runs on CPU) or 'auto'."
        )
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"Expected fp16 or bf16 for flash_attention_2, got {dtype}. Fix: train in bf16 (pass"
            " dtype=torch.bfloat16 for bf16-mixed) or use 'sdpa'."
        )


def _resolve_hf(model: nn.Module, implementation: str, device: torch.device, dtype: torch.dtype) -> str:
    supports_flash = bool(getattr(model, "_supports_flash_attn", False))
    supports_sdpa = bool(getattr(model, "_supports_sdpa", False))
    if implementation == "auto":
        flash_ok = (
            supports_flash
            and bool(_imports._FLASH_ATTN_AVAILABLE)
            and device.type == "cuda"
            and dtype in (torch.float16, torch.bfloat16)
        )
        return "flash_attention_2" if flash_ok else ("sdpa" if supports_sdpa else "eager")
    if implementation == "flash_attention_2" and not supports_flash:
        raise ValueError(
            f"Expected a model that supports flash_attention_2, got {type(model).__name__}. Fix: use 'sdpa'."
        )
    if implementation == "sdpa" and not supports_sdpa:
        raise ValueError(
            f"Expected a model that supports sdpa, got {type(model).__name__}. Fix: use 'eager'."
        )
    return implementation


def _hf_models(module: nn.Module) -> list[nn.Module]:
    """The outermost ``transformers.PreTrainedModel`` instances in ``module`` (none if it isn't loaded)."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return []
    from transformers import PreTrainedModel

    found: list[tuple[str, nn.Module]] = []
    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel) and not any(
            name.startswith(p + ".") or p == "" for p, _ in found
        ):
            found.append((name, sub))
    return [sub for _, sub in found]


def _route_mha(mha: nn.MultiheadAttention, to_sdpa: bool) -> None:
    if to_sdpa and _FLAG not in mha.__dict__:
        mha.__dict__[_FLAG] = True
        mha.forward = MethodType(_sdpa_mha_forward, mha)
    elif not to_sdpa and mha.__dict__.pop(_FLAG, None):
        mha.__dict__.pop("forward", None)


def _sdpa_mha_forward(
    self: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, None]:
    if need_weights:
        _warning_cache.warn(
            "nn.MultiheadAttention was routed to scaled_dot_product_attention by lightning_memopt, which"
            " does not return attention weights: `need_weights=True` gives None weights. Pass"
            " need_weights=False to silence this, or apply_attention(module, 'eager') to get weights back."
        )
    return type(self).forward(
        self,
        query,
        key,
        value,
        key_padding_mask=key_padding_mask,
        need_weights=False,
        attn_mask=attn_mask,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
