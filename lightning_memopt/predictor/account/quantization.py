"""Quantized weight memory (lecture part III): int8, int4, NF4 and GGUF Q8_0 / Q4_0 / Q4_K / Q6_K.

Every format is counted byte-exactly as its library stores it, block overheads included:

==========  ===================================================================  ==============
name        storage (source)                                                     bits / weight
==========  ===================================================================  ==============
``q8_0``    GGUF ``block_q8_0``: fp16 ``d`` + 32 int8 = 34 bytes / 32 weights     8.5
``q6_k``    GGUF ``block_q6_K``: 128 + 64 + 16 + fp16 ``d`` = 210 bytes / 256     6.5625
``q4_0``    GGUF ``block_q4_0``: fp16 ``d`` + 16 bytes = 18 bytes / 32            4.5
``q4_k``    GGUF ``block_q4_K``: fp16 ``d``, ``dmin`` + 12 bytes of 6-bit         4.5
            scales/mins + 128 bytes = 144 bytes / 256
``int8``    bitsandbytes LLM.int8 (``Linear8bitLt``): int8 weight + one fp32      8 + 32 / in
            scale per output row (``SCB``)
``int4``    GPTQ / AWQ, group size 128: packed 4-bit weight + per (group, output  4.15625
            channel) an fp16 scale and a packed 4-bit zero point
``nf4``     bitsandbytes ``Linear4bit`` (QLoRA), block size 64: packed 4-bit +    4.5
            one fp32 absmax per 64 weights of the flattened tensor
``nf4-dq``  the same with double quantisation (QLoRA paper, Dettmers et al.      4.127
            2023, section 3): absmax in int8, one fp32 per 256 absmax blocks
==========  ===================================================================  ==============

GGUF block structs are those of llama.cpp's ``ggml/src/ggml-common.h``. Which tensors are quantized follows
each tool's convention:

* **GGUF** (``llama-quantize``, default mode): every 2-D weight, token embeddings included, uses the format;
  1-D tensors (norms, biases) stay F32. The output matrix (``lm_head``, or the token embedding when it is
  tied) is stored as Q6_K for every format but Q8_0 (``llama_tensor_get_type`` in ``src/llama-quant.cpp``).
  A row length that is not a multiple of the block size falls back as llama.cpp does (Q4_K -> Q5_0,
  Q6_K -> Q8_0, then F16). Q4_K here is pure Q4_K; ``Q4_K_M`` additionally raises some ``attn_v`` and
  ``ffn_down`` matrices to Q6_K, so it is ~5 % larger than this figure.
* **bitsandbytes / GPTQ** (transformers' ``get_keys_to_not_convert``): only ``nn.Linear`` layers are
  replaced; embeddings, norms, ``lm_head`` and tied weights stay in the 16-bit compute dtype (2 bytes).

For a bare parameter count (no structure) every parameter is counted at the format's bits per weight.
The lecture's "Llama-3.1-8B Q8_0 is ~8 GB" (8e9 x 1 byte) is exactly 8,532,934,656 bytes (7.95 GiB) of
tensors by this count: the 8.5-bit block and the F32 norms make it 6.6 % more than 1 byte per parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "QUANTIZATIONS",
    "QuantizationFormat",
    "TensorShape",
    "hf_config",
    "model_tensors",
    "quantized_weight_bytes",
]


@dataclass(frozen=True)
class TensorShape:
    """One weight tensor of a model, as the quantizers see it.

    Attributes:
        name: a readable name (``"model.layers.0.self_attn.q_proj.weight"``).
        kind: ``"linear"`` (a 2-D ``nn.Linear``/``Conv1D`` weight in a block), ``"embedding"``, ``"output"``
            (``lm_head``), ``"matrix"`` (another >= 2-D tensor) or ``"vector"`` (norms, biases).
        rows: output features (rows of the stored matrix; 1 for vectors).
        cols: input features (the row length quantization blocks run along).
        count: how many identical tensors this entry stands for (e.g. one per layer).
        tied: whether this embedding also serves as the output matrix.
    """

    name: str
    kind: str
    rows: int
    cols: int
    count: int = 1
    tied: bool = False

    @property
    def numel(self) -> int:
        """Elements of one tensor."""
        return self.rows * self.cols


@dataclass(frozen=True)
class QuantizationFormat:
    """A weight storage format.

    Attributes:
        name: the CLI name (``"q8_0"``).
        family: ``"gguf"``, ``"bitsandbytes"`` or ``"gptq"`` (decides which tensors are quantized).
        matrix_bytes: bytes of one ``rows x cols`` matrix in this format (``cols`` is the row length).
        block_size: weights per block along a row (GGUF: rows must be a multiple; others: informative).
        bits_per_weight: the nominal average, overheads included, for a bare parameter count.
        output_format: GGUF only, the format of the output matrix (llama.cpp's rule), else ``None``.
        description: where the layout comes from.
    """

    name: str
    family: str
    matrix_bytes: Callable[[int, int], int]
    block_size: int
    bits_per_weight: float
    output_format: "str | None"
    description: str


def _gguf(block_bytes: int, block: int) -> Callable[[int, int], int]:
    return lambda rows, cols: rows * (cols // block) * block_bytes


def _int4_gptq(rows: int, cols: int, group: int = 128) -> int:
    groups = math.ceil(cols / group)
    return math.ceil(rows * cols / 2) + rows * groups * 2 + math.ceil(rows * groups / 2)


def _nf4(rows: int, cols: int, double_quant: bool = False, block: int = 64) -> int:
    n = rows * cols
    blocks = math.ceil(n / block)
    if not double_quant:
        return math.ceil(n / 2) + 4 * blocks
    # absmax in int8 + one fp32 scale per 256 absmax blocks + one fp32 offset per tensor (bitsandbytes
    # ``quantize_4bit(compress_statistics=True)``).
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4


QUANTIZATIONS: "dict[str, QuantizationFormat]" = {
    f.name: f
    for f in (
        QuantizationFormat("q8_0", "gguf", _gguf(34, 32), 32, 8.5, None, "ggml block_q8_0: fp16 d + 32 x int8"),
        QuantizationFormat(
            "q6_k", "gguf", _gguf(210, 256), 256, 6.5625, "q6_k", "ggml block_q6_K: ql[128] qh[64] scales[16] d"
        ),
        QuantizationFormat("q5_0", "gguf", _gguf(22, 32), 32, 5.5, "q6_k", "ggml block_q5_0: fp16 d + qh[4] + qs[16]"),
        QuantizationFormat("q4_0", "gguf", _gguf(18, 32), 32, 4.5, "q6_k", "ggml block_q4_0: fp16 d + 16 bytes"),
        QuantizationFormat(
            "q4_k", "gguf", _gguf(144, 256), 256, 4.5, "q6_k", "ggml block_q4_K: d, dmin, scales[12], qs[128]"
        ),
        QuantizationFormat(
            "int8", "bitsandbytes", lambda r, c: r * c + 4 * r, 1, 8.0, None, "LLM.int8: int8 + fp32 SCB per row"
        ),
        QuantizationFormat("int4", "gptq", _int4_gptq, 128, 4.15625, None, "GPTQ/AWQ g128: fp16 scale, 4-bit zero"),
        QuantizationFormat("nf4", "bitsandbytes", _nf4, 64, 4.5, None, "bitsandbytes NF4, fp32 absmax per 64"),
        QuantizationFormat(
            "nf4-dq",
            "bitsandbytes",
            lambda r, c: _nf4(r, c, double_quant=True),
            64,
            4 + 8 / 64 + 32 / (64 * 256),
            None,
            "bitsandbytes NF4 with double quantization (QLoRA)",
        ),
    )
}
#: llama.cpp's fallback when a row is not a multiple of the block (``llama_tensor_get_type_fallback``).
_GGUF_FALLBACK = {"q4_k": "q5_0", "q6_k": "q8_0"}
_F16, _F32 = 2, 4


def get_format(quantization: "str | QuantizationFormat") -> QuantizationFormat:
    """Look up a format by name (case-insensitive, ``Q4_K_M``-style suffixes are not accepted).

    Example:
        >>> get_format("Q8_0").bits_per_weight
        8.5
    """
    if isinstance(quantization, QuantizationFormat):
        return quantization
    if not isinstance(quantization, str) or quantization.lower() not in QUANTIZATIONS:
        raise ValueError(
            f"Expected a quantization in {sorted(QUANTIZATIONS)}, got {quantization!r}."
            " Fix: pick one of these names (e.g. 'q8_0' for GGUF Q8_0, 'nf4' for QLoRA)."
        )
    return QUANTIZATIONS[quantization.lower()]


def _gguf_bytes(fmt_name: str, rows: int, cols: int) -> int:
    """Bytes of one matrix in a GGUF format, with llama.cpp's fallback for incompatible row lengths."""
    name: "str | None" = fmt_name
    while name is not None:
        fmt = QUANTIZATIONS[name]
        if cols % fmt.block_size == 0:
            return fmt.matrix_bytes(rows, cols)
        name = _GGUF_FALLBACK.get(name)
    return rows * cols * _F16


def tensor_bytes(tensor: TensorShape, quantization: "str | QuantizationFormat") -> int:
    """Stored bytes of ``tensor`` (all ``count`` copies) in ``quantization``, following the tool's convention.

    Example:
        >>> tensor_bytes(TensorShape("w", "linear", 4096, 4096), "q8_0")  # 4096 rows x 128 blocks x 34 B
        17825792
        >>> tensor_bytes(TensorShape("norm", "vector", 1, 4096), "q8_0")  # GGUF keeps 1-D tensors in F32
        16384
    """
    fmt = get_format(quantization)
    if fmt.family == "gguf":
        if tensor.kind == "vector":
            one = tensor.numel * _F32
        elif tensor.kind == "output" or tensor.tied:
            one = _gguf_bytes(fmt.output_format or fmt.name, tensor.rows, tensor.cols)
        else:
            one = _gguf_bytes(fmt.name, tensor.rows, tensor.cols)
    elif tensor.kind == "linear":
        one = fmt.matrix_bytes(tensor.rows, tensor.cols)
    else:
        one = tensor.numel * _F16
    return one * tensor.count


def model_tensors(model: Any) -> "list[TensorShape]":
    """The weight tensors of ``model`` (an ``nn.Module``, a preset, a Hugging Face config, dict or path).

    A config is built into its ``AutoModelForCausalLM`` on the meta device (no memory, ~0.1 s for 70B), so
    every architecture transformers knows is counted tensor by tensor. Returns an empty list for a bare
    parameter count (no structure known).

    Example:
        >>> import torch
        >>> [t.kind for t in model_tensors(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2)))]
        ['embedding', 'linear', 'vector']
        >>> sum(t.numel * t.count for t in model_tensors("llama-3-8b"))
        8030261248
    """
    import torch

    if isinstance(model, torch.nn.Module):
        return _module_tensors(model)
    if isinstance(model, (int, float)) and not isinstance(model, bool):
        return []
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return _module_tensors(AutoModelForCausalLM.from_config(hf_config(model)))


def hf_config(model: Any) -> Any:
    """A transformers ``PretrainedConfig`` from a preset name, a config.json path, a dict or a config object.

    Example:
        >>> hf_config("gpt2").n_layer
        12
    """
    import json
    import os

    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                model = json.load(f)
        else:
            from lightning_memopt.predictor.read.presets import get_preset

            model = get_preset(str(model))
    if not isinstance(model, dict):
        raise TypeError(
            f"Expected an nn.Module, a preset name, a config.json path, a dict or a PretrainedConfig, got"
            f" {type(model).__name__}."
        )
    if "model_type" not in model:
        raise ValueError(
            f"Expected the config to name its `model_type` (e.g. 'llama'), got keys {sorted(model)[:8]}..."
            " Fix: add \"model_type\" to the config."
        )
    return AutoConfig.for_model(**model)


def _module_tensors(module: Any) -> "list[TensorShape]":
    import torch

    output = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    output_params = {id(p) for p in output.parameters()} if output is not None else set()
    seen: "dict[int, int]" = {}
    tensors: "list[TensorShape]" = []
    for mod_name, mod in module.named_modules():
        for p_name, param in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(param) in seen:  # tied: the first owner (the embedding) also serves as the output matrix
                first = tensors[seen[id(param)]]
                tensors[seen[id(param)]] = TensorShape(first.name, first.kind, first.rows, first.cols, 1, True)
                continue
            seen[id(param)] = len(tensors)
            cls = type(mod).__name__
            if param.dim() <= 1:
                kind, rows, cols = "vector", 1, param.numel()
            elif isinstance(mod, torch.nn.Embedding):
                kind, (rows, cols) = "embedding", param.shape
            elif id(param) in output_params or mod_name.endswith("lm_head"):
                kind, (rows, cols) = "output", param.shape
            elif isinstance(mod, torch.nn.Linear):
                kind, (rows, cols) = "linear", param.shape
            elif cls == "Conv1D" and param.dim() == 2:  # transformers' GPT-2 layer stores (in, out)
                kind, (cols, rows) = "linear", param.shape
            else:
                kind, rows, cols = "matrix", param.shape[0], param[0].numel()
            tensors.append(TensorShape(name, kind, int(rows), int(cols)))
    return tensors


def _num_parameters(model: Any) -> int:
    if isinstance(model, (int, float)) and not isinstance(model, bool):
        if model <= 0:
            raise ValueError(f"Expected a positive parameter count, got {model!r}.")
        return int(model)
    return sum(t.numel * t.count for t in model_tensors(model))


def quantized_weight_bytes(model: Any, quantization: "str | QuantizationFormat") -> int:
    """Bytes of ``model``'s weights stored in ``quantization`` (block overheads and unquantized tensors included).

    Args:
        model: an ``nn.Module``, a preset name, a Hugging Face config (object, dict or path) or a parameter
            count (then every parameter is counted at the format's average bits per weight).
        quantization: a name in :data:`QUANTIZATIONS` or a :class:`QuantizationFormat`.

    Example:
        >>> quantized_weight_bytes(8e9, "q8_0")  # 8e9 x 8.5 bits
        8500000000
        >>> quantized_weight_bytes(32 * 4096, "q4_0")
        73728
    """
    fmt = get_format(quantization)
    tensors = model_tensors(model)
    if not tensors:
        return math.ceil(_num_parameters(model) * fmt.bits_per_weight / 8)
    return sum(tensor_bytes(t, fmt) for t in tensors)


def _shape_attr(model: Any, *names: str) -> "int | None":
    for obj in (model, getattr(model, "config", None)):
        for name in names:
            value = getattr(obj, name, None) if obj is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _dims(model: Any) -> "dict[str, int]":
    """Layers, hidden size, KV width, intermediate size and vocabulary of a decoder model."""
    import torch

    source = model if isinstance(model, torch.nn.Module) else hf_config(model)
    hidden = _shape_attr(source, "hidden_size", "n_embd")
    layers = _shape_attr(source, "num_layers", "num_hidden_layers", "n_layer")
    heads = _shape_attr(source, "num_attention_heads", "num_heads", "n_head")
    vocab = _shape_attr(source, "vocab_size")
    if None in (hidden, layers, heads, vocab):
        raise ValueError(
            "Expected a decoder model with hidden_size, num_hidden_layers, num_attention_heads and vocab_size"
            f" to size the KV cache, got {type(model).__name__}. Fix: pass a preset or a Hugging Face config."
        )
    kv_heads = _shape_attr(source, "num_key_value_heads", "num_kv_heads") or heads
    head_dim = _shape_attr(source, "head_dim") or hidden // heads
    inter = _shape_attr(source, "intermediate_size", "n_inner") or 4 * hidden
    return {"layers": layers, "hidden": hidden, "kv": kv_heads * head_dim, "inter": inter, "vocab": vocab}
