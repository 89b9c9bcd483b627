"""A quantized model's memory: inference (quantized weights + KV cache) and QLoRA (LoRA adapters on a frozen
quantized base), per device.

The weights are counted byte-exactly per format (:mod:`lightning_memopt.predictor.account.quantization`). A QLoRA step
is predicted on the model it trains, traced like any model: the config's model with PEFT LoRA adapters on every linear
layer (Dettmers et al. 2023, "QLoRA", section 4: all linear layers) whose frozen base linears are replaced by
:class:`QuantizedLinear`, a stand-in that holds the format's bytes and allocates what bitsandbytes'
``MatMul4Bit`` does: in forward a dequantized 16-bit weight for the matmul (freed after it) and the input saved for
backward; in backward the dequantized weight again and the input's gradient. The adapters stay in fp32 (PEFT's
``autocast_adapter_dtype``) and compute runs under autocast in ``precision``'s 16-bit dtype.
"""

from typing import Any

import torch
from torch import nn

from lightning_memopt.planning.estimate import estimate_memory
from lightning_memopt.predictor.account.quantization import _dims, get_format, quantized_weight_bytes
from lightning_memopt.predictor.report.estimate import MemoryEstimate

#: Optimizer state bytes per trainable parameter; ``adamw8bit`` (bitsandbytes' 8-bit AdamW) keeps two int8 states.
_OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 0, "adamw8bit": 2}
_F16, _F32 = 2, 4


def estimate_quantized(
    model: Any,
    quantization: str,
    *,
    mode: str = "inference",
    micro_batch_size: int = 1,
    seq_len: "int | None" = None,
    precision: str = "bf16-mixed",
    optimizer: str = "adamw",
    lora_rank: int = 16,
    activation_checkpointing: bool = False,
    attention: "str | None" = None,
    liger: bool = False,
    kv_cache_bytes: int = 2,
) -> MemoryEstimate:
    """Memory of a quantized model, for inference or for frozen-base (QLoRA) fine-tuning, on one device.

    ``mode="inference"``: ``parameters`` = quantized weights; ``buffers`` = the KV cache,
    ``2 * layers * micro_batch_size * seq_len * kv_heads * head_dim * kv_cache_bytes`` (one K and one V per layer
    and token); ``logits`` = one fp32 row of logits per sequence (generation keeps the last position);
    ``activations`` = a prefill working set of one block, ``b s (2 h + 2 i)`` 16-bit elements (residual, normed
    input, gate and up outputs of the MLP); this last term is an approximation, not a measurement.

    ``mode="qlora"``: the traced QLoRA model (see the module docstring), with the plain-torch engine (one device).

    Args:
        model: a preset, a Hugging Face config (object, dict or path), an ``nn.Module`` (inference only), or (inference
            without ``seq_len`` only) a parameter count.
        quantization: a name in :data:`~lightning_memopt.predictor.account.quantization.QUANTIZATIONS`.
        mode: ``"inference"`` or ``"qlora"``.
        micro_batch_size: sequences per forward.
        seq_len: tokens per sequence (KV cache length at inference; required for ``"qlora"``).
        precision: Lightning precision of the compute (QLoRA).
        optimizer: the adapters' optimizer: ``"adamw"``, ``"adam"``, ``"sgd"`` or ``"adamw8bit"``.
        lora_rank: LoRA rank ``r``.
        activation_checkpointing: QLoRA only: checkpoint every block.
        attention: QLoRA only: attention implementation (``None``: the model's).
        liger: QLoRA only: Liger kernels, as in :func:`estimate_memory`.
        kv_cache_bytes: bytes per cached K/V element (2 for fp16/bf16, 1 for an 8-bit cache).

    Example:
        >>> est = estimate_quantized(8e9, "q8_0")
        >>> est.parameters, est.total
        (8500000000, 8500000000)
    """
    fmt = get_format(quantization)
    if mode not in ("inference", "qlora"):
        raise ValueError(f"Expected `mode` to be 'inference' or 'qlora', got {mode!r}. Fix: mode='qlora' to train.")
    for name, value in (("micro_batch_size", micro_batch_size), ("kv_cache_bytes", kv_cache_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}. Fix: e.g. {name}=1.")
    if seq_len is not None and (not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1):
        raise ValueError(f"Expected `seq_len` to be a positive int or None, got {seq_len!r}. Fix: e.g. seq_len=2048.")
    weights = quantized_weight_bytes(model, fmt)
    details: "dict[str, Any]" = {"quantization": fmt.name, "mode": mode, "quantized_weight_bytes": weights}
    if mode == "inference":
        kv_cache = activations = logits = 0
        if seq_len is not None:
            d = _dims(model)
            kv_cache = 2 * d["layers"] * micro_batch_size * seq_len * d["kv"] * kv_cache_bytes
            activations = micro_batch_size * seq_len * (2 * d["hidden"] + 2 * d["inter"]) * _F16
            logits = micro_batch_size * d["vocab"] * _F32
        details["kv_cache_bytes"] = kv_cache
        parts = {"parameters": weights, "gradients": 0, "optimizer_states": 0, "activations": activations,
                 "logits": logits, "buffers": kv_cache}  # fmt: skip
        return MemoryEstimate(**parts, total=sum(parts.values()), details=details)
    if seq_len is None:
        raise ValueError("Expected `seq_len` for mode='qlora' (activations grow with it), got None. Fix: seq_len=2048.")
    if optimizer not in _OPTIMIZER_STATE_BYTES:
        raise ValueError(
            f"Expected `optimizer` in {sorted(_OPTIMIZER_STATE_BYTES)} for QLoRA, got {optimizer!r}. Fix: 'adamw'."
        )
    optimizer_name = "sgd" if optimizer == "adamw8bit" else optimizer  # the 8-bit states are added below
    est = estimate_memory(
        _qlora_model(model, fmt, lora_rank), engine="torch", precision=precision, optimizer=optimizer_name,
        micro_batch_size=micro_batch_size, seq_len=seq_len, activation_checkpointing=activation_checkpointing,
        attention=attention, liger=liger,
    )  # fmt: skip
    adapters = int(est.details["trainable_parameters"])
    details.update(est.details, lora_parameters=adapters, lora_rank=lora_rank, quantization=fmt.name, mode=mode)
    if optimizer == "adamw8bit":
        extra = _OPTIMIZER_STATE_BYTES[optimizer] * adapters
        return MemoryEstimate(**{**est.to_dict(), "optimizer_states": est.optimizer_states + extra,
                                 "total": est.total + extra, "details": details})  # fmt: skip
    return MemoryEstimate(**{**est.to_dict(), "details": details})


class _DequantizedMatmul(torch.autograd.Function):
    """``x @ dequantize(W).T`` as bitsandbytes' ``MatMul4Bit`` allocates it (the weight's values do not matter)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, quantized: torch.Tensor, out_features: int) -> torch.Tensor:
        ctx.out_features = out_features
        ctx.save_for_backward(x)
        weight = x.new_empty((out_features, x.shape[-1]))  # dequantized for this matmul, freed after it
        return x @ weight.t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (x,) = ctx.saved_tensors
        weight = grad.new_empty((ctx.out_features, x.shape[-1]))
        return grad @ weight, None, None


class QuantizedLinear(nn.Module):
    """A frozen quantized ``nn.Linear`` for the trace: its weight is the format's bytes (a frozen ``uint8``
    parameter, counted as it is stored), its matmul :class:`_DequantizedMatmul`; the bias stays 16-bit."""

    def __init__(self, linear: nn.Linear, nbytes: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        device = linear.weight.device
        self.weight = nn.Parameter(torch.empty(nbytes, dtype=torch.uint8, device=device), requires_grad=False)
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(torch.empty(linear.out_features, dtype=torch.bfloat16, device=device),
                                     requires_grad=False)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        out = _DequantizedMatmul.apply(x.to(dtype), self.weight, self.out_features)
        return out + self.bias.to(out.dtype) if self.bias is not None else out


def _qlora_model(model: Any, fmt: Any, rank: int) -> Any:
    """The config's model with LoRA adapters on every linear, its frozen base linears quantized (built on the meta
    device, kept like any built model)."""
    from lightning_memopt.planning.estimate import with_lora
    from lightning_memopt.predictor.account.quantization import TensorShape, tensor_bytes
    from lightning_memopt.predictor.read.sources import config_of, from_config

    config = config_of(model)
    if config is None:
        raise ValueError(
            f"Expected a config or a preset for a QLoRA estimate, got {type(model).__name__}. Fix: pass its config"
            " (the base is quantized and the adapters added to a model built from it)."
        )

    def prepare(module: nn.Module) -> nn.Module:
        module = with_lora(module, rank, "all-linear")
        for name, sub in list(module.named_modules()):
            base = getattr(sub, "base_layer", None)
            if isinstance(base, nn.Linear) and not base.weight.requires_grad:
                shape = TensorShape(f"{name}.weight", "linear", base.out_features, base.in_features)
                sub.base_layer = QuantizedLinear(base, tensor_bytes(shape, fmt))
        for param in module.parameters():  # the rest of the frozen base in 16 bits, the adapters in fp32
            if not param.requires_grad and param.is_floating_point():
                param.data = param.data.to(torch.bfloat16)
        return module

    return from_config(config, prepare=prepare, label=f"qlora={fmt.name}:{rank}")
