"""Normalise the ``model`` argument of the predictor into a :class:`ModelSpec`.

A model is given as a Hugging Face config (object, dict or ``config.json`` path), a preset name, an
``nn.Module`` (a Hugging Face ``PreTrainedModel``, a LightningModule holding one, or any transformer written
in plain PyTorch) or a parameter count (``8e9``, ``"8B"``, ``"7.5e9"``: model states only).
"""

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_memopt.predictor.presets import PRESETS, get_preset

#: Leaf modules in forward order: (name, numels of the module's own parameters).
ModuleParams = "tuple[tuple[str, tuple[int, ...]], ...]"
_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBtT]?)\s*$")
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
#: ``tie_word_embeddings`` when a config dict does not say (the model classes' defaults).
_TIE_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False, "gpt2": True}


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a model, as the predictor needs it.

    Attributes:
        name: where it came from (preset name, ``model_type``, class name or ``"count"``).
        num_parameters: unique trainable parameters (tied weights counted once).
        family: ``"llama"`` (RMSNorm + SwiGLU + RoPE: Llama, Mistral, Qwen2...), ``"gpt2"`` (LayerNorm + GELU
            + learned positions), ``"generic"`` (a plain-PyTorch transformer found structurally) or
            ``"count"``.
        hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size, vocab_size: the shapes
            (0 when only a count is known).
        tied_embeddings: the output projection shares the embedding matrix.
        norm: ``"rmsnorm"`` or ``"layernorm"``. mlp: ``"swiglu"`` (gated) or ``"gelu"``.
        attention_bias: q/k/v projections have biases (Qwen2). mlp_bias: MLP projections have biases.
        position: ``"rope"`` or ``"learned"``.
        max_position_embeddings: the longest sequence the config allows (default ``seq_len``), or ``None``.
        module_params: leaf modules in forward order with the numels of their parameters (ZeRO-3 gathering,
            persistence threshold, the largest tensor for per-tensor optimizer temporaries).
        is_hf: built from a Hugging Face config or model (its loss upcasts logits to fp32).
        step_calls_root: the module's ``training_step`` calls the module itself (``self(...)``), see
            :func:`step_calls_root`.
        packed_projection_params: elements of ``nn.MultiheadAttention`` packed input projections
            (``in_proj_weight``). Under ZeRO-3 every module gets its inputs as new tensors (DeepSpeed's
            ``_post_backward_module_hook``), so the attention takes its separate-q/k/v path and projects with
            three views of the gathered weight, which DeepSpeed's Linear saves for backward: the weight stays
            gathered from its forward to its backward.

    Example:
        >>> spec = resolve_model("llama-3-8b")
        >>> spec.num_parameters, spec.num_kv_heads, spec.head_dim
        (8030261248, 8, 128)
    """

    name: str
    num_parameters: int
    family: str = "count"
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0
    tied_embeddings: bool = False
    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    attention_bias: bool = False
    mlp_bias: bool = False
    position: str = "rope"
    max_position_embeddings: "int | None" = None
    module_params: Any = field(default=(), repr=False, compare=False)
    is_hf: bool = False
    step_calls_root: bool = False
    packed_projection_params: int = 0

    def __post_init__(self) -> None:
        if self.num_parameters <= 0:
            raise ValueError(f"Expected a positive parameter count, got {self.num_parameters!r}.")
        if self.family not in ("llama", "gpt2", "generic", "count"):
            raise ValueError(
                f"Expected family in ('llama', 'gpt2', 'generic', 'count'), got {self.family!r}."
            )
        if self.has_structure and self.num_heads and self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"Expected num_attention_heads ({self.num_heads}) divisible by num_key_value_heads"
                f" ({self.num_kv_heads})."
            )

    @property
    def has_structure(self) -> bool:
        """Whether layer shapes are known (activations can be estimated)."""
        return self.family != "count"

    @property
    def param_numels(self) -> "list[int]":
        """Numels of every parameter tensor (forward order)."""
        if self.module_params:
            return [n for _, numels in self.module_params for n in numels]
        return [self.num_parameters]

    @property
    def largest_param(self) -> int:
        """Numel of the largest parameter tensor."""
        return max(self.param_numels)


def resolve_model(model: Any) -> ModelSpec:
    """Turn any accepted ``model`` argument into a :class:`ModelSpec`.

    Args:
        model: a :class:`ModelSpec`; a preset name (see :data:`~lightning_memopt.predictor.presets.PRESETS`);
            a Hugging Face config object, dict or ``config.json`` path (file or directory); an ``nn.Module``;
            or a parameter count (int/float, or a string like ``"8B"``, ``"125M"``, ``"7.5e9"``).

    Raises:
        ValueError: unknown preset, unreadable path, a config missing needed fields, a non-positive count.
        TypeError: any other type.

    Example:
        >>> resolve_model("8B").num_parameters
        8000000000
        >>> resolve_model({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
        ...                "vocab_size": 50257, "n_positions": 1024}).num_parameters
        124439808
    """
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, bool):
        raise TypeError(f"Expected a model (preset, config, nn.Module or parameter count), got {model!r}.")
    if isinstance(model, (int, float)):
        return _from_count(model, repr(model))
    if isinstance(model, (str, os.PathLike)):
        return _from_string(os.fspath(model))
    if isinstance(model, dict):
        return from_hf_config(model)
    if isinstance(model, nn.Module):
        return from_module(model)
    if hasattr(model, "to_dict") and callable(model.to_dict):
        return from_hf_config(model.to_dict())
    raise TypeError(
        f"Expected a preset name, a Hugging Face config (object, dict or path), an nn.Module or a parameter"
        f" count, got {type(model).__name__}. Fix: pass e.g. 'llama-3-8b' or AutoConfig.from_pretrained(...)."
    )


def _from_count(count: float, text: str) -> ModelSpec:
    if not count > 0 or count != count or count == float("inf"):
        raise ValueError(f"Expected a positive parameter count, got {text}.")
    return ModelSpec(name="count", num_parameters=int(round(count)), family="count")


def _from_string(text: str) -> ModelSpec:
    if text.strip().lower() in PRESETS:
        return from_hf_config(get_preset(text), name=text.strip().lower())
    path = os.path.join(text, "config.json") if os.path.isdir(text) else text
    if os.path.isfile(path):
        with open(path) as fh:
            try:
                config = json.load(fh)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"Expected {path!r} to be a JSON config, but it does not parse: {err}."
                ) from None
        return from_hf_config(config, name=os.path.basename(os.path.dirname(os.path.abspath(path))) or path)
    match = _COUNT.match(text)
    if match:
        return _from_count(float(match.group(1)) * _SUFFIX[match.group(2).lower()], repr(text))
    # --- Hugging Face Hub ids (owner/name): the config through transformers and the local cache (hub.py) ---
    from lightning_memopt.predictor.hub import is_hub_id, load_hub_config

    if is_hub_id(text):
        return from_hf_config(load_hub_config(text).to_dict(), name=text)
    # --- end of the Hub hook ---
    raise ValueError(
        f"Expected a preset in {sorted(PRESETS)}, a config.json path or a parameter count like '8B' or"
        " '7.5e9',"
        f" got {text!r}."
    )


def _require(config: "dict[str, Any]", keys: "dict[str, tuple[str, ...]]") -> "dict[str, Any]":
    out, missing = {}, []
    for name, aliases in keys.items():
        for alias in aliases:
            if config.get(alias) is not None:
                out[name] = config[alias]
                break
        else:
            missing.append(aliases[0])
    if missing:
        raise ValueError(
            f"Expected the config to define {missing} (model_type={config.get('model_type')!r}), but they are"
            " missing. Fix: pass a complete Hugging Face config.json, or a parameter count for model states"
            " only."
        )
    return out


def from_hf_config(config: "dict[str, Any]", name: "str | None" = None) -> ModelSpec:
    """Build a :class:`ModelSpec` from a Hugging Face config dict (``PretrainedConfig.to_dict()``).

    GPT-2-style configs (``n_embd``/``n_layer``/``n_head``) get LayerNorm + GELU + learned positions; all
    others the Llama-style decoder (RMSNorm, SwiGLU, RoPE, grouped-query attention) that Llama, Mistral, Qwen2
    and most recent decoders share. Parameter shapes follow ``modeling_llama.py`` / ``modeling_qwen2.py`` /
    ``modeling_gpt2.py`` of transformers.

    Example:
        >>> from_hf_config({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        ...                 "num_attention_heads": 4, "vocab_size": 256}).num_parameters
        98624
    """
    model_type = str(config.get("model_type", "") or "")
    tied = bool(config.get("tie_word_embeddings", _TIE_DEFAULT.get(model_type, True)))
    if model_type == "gpt2" or ("n_embd" in config and "hidden_size" not in config):
        return _gpt2_spec(config, tied, name or model_type or "gpt2")
    c = _require(
        config,
        {
            "d": ("hidden_size",),
            "layers": ("num_hidden_layers",),
            "heads": ("num_attention_heads",),
            "inter": ("intermediate_size",),
            "vocab": ("vocab_size",),
        },
    )
    d, heads, inter, vocab = c["d"], c["heads"], c["inter"], c["vocab"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or d // heads
    qkv_bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
    o_bias = bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False))
    # registration order of LlamaDecoderLayer / Qwen2DecoderLayer (the order of DeepSpeed's flat buffer)
    layer: list = [
        ("q_proj", (d * heads * head_dim,) + ((heads * head_dim,) if qkv_bias else ())),
        ("k_proj", (d * kv * head_dim,) + ((kv * head_dim,) if qkv_bias else ())),
        ("v_proj", (d * kv * head_dim,) + ((kv * head_dim,) if qkv_bias else ())),
        ("o_proj", (heads * head_dim * d,) + ((d,) if o_bias else ())),
        ("gate_proj", (d * inter,) + ((inter,) if mlp_bias else ())),
        ("up_proj", (d * inter,) + ((inter,) if mlp_bias else ())),
        ("down_proj", (inter * d,) + ((d,) if mlp_bias else ())),
        ("input_layernorm", (d,)),
        ("post_attention_layernorm", (d,)),
    ]
    modules = [("embed_tokens", (vocab * d,))]
    for i in range(c["layers"]):
        modules += [(f"layers.{i}.{n}", p) for n, p in layer]
    modules.append(("norm", (d,)))
    modules.append(("lm_head", () if tied else (vocab * d,)))
    return ModelSpec(
        name=name or model_type or "llama",
        num_parameters=sum(n for _, p in modules for n in p),
        family="llama",
        hidden_size=d,
        num_layers=c["layers"],
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=vocab,
        tied_embeddings=tied,
        norm="rmsnorm",
        mlp="swiglu",
        attention_bias=qkv_bias,
        mlp_bias=mlp_bias,
        position="rope",
        max_position_embeddings=config.get("max_position_embeddings"),
        module_params=tuple(modules),
        is_hf=True,
    )


def _gpt2_spec(config: "dict[str, Any]", tied: bool, name: str) -> ModelSpec:
    c = _require(
        config,
        {
            "d": ("n_embd", "hidden_size"),
            "layers": ("n_layer", "num_hidden_layers"),
            "heads": ("n_head", "num_attention_heads"),
            "vocab": ("vocab_size",),
            "pos": ("n_positions",),
        },
    )
    d, vocab, pos = c["d"], c["vocab"], c["pos"]
    inter = config.get("n_inner") or 4 * d
    layer = [
        ("ln_1", (d, d)),
        ("attn.c_attn", (d * 3 * d, 3 * d)),
        ("attn.c_proj", (d * d, d)),
        ("ln_2", (d, d)),
        ("mlp.c_fc", (d * inter, inter)),
        ("mlp.c_proj", (inter * d, d)),
    ]
    modules = [("wte", (vocab * d,)), ("wpe", (pos * d,))]
    for i in range(c["layers"]):
        modules += [(f"h.{i}.{n}", p) for n, p in layer]
    modules += [("ln_f", (d, d)), ("lm_head", () if tied else (vocab * d,))]
    return ModelSpec(
        name=name,
        num_parameters=sum(n for _, p in modules for n in p),
        family="gpt2",
        hidden_size=d,
        num_layers=c["layers"],
        num_heads=c["heads"],
        num_kv_heads=c["heads"],
        head_dim=d // c["heads"],
        intermediate_size=inter,
        vocab_size=vocab,
        tied_embeddings=tied,
        norm="layernorm",
        mlp="gelu",
        attention_bias=True,
        mlp_bias=True,
        position="learned",
        max_position_embeddings=pos,
        module_params=tuple(modules),
        is_hf=True,
    )


def _find_hf_model(module: nn.Module) -> "nn.Module | None":
    """The first module (breadth-first) carrying a Hugging Face ``config`` with ``to_dict``."""
    queue = [module]
    while queue:
        current = queue.pop(0)
        config = getattr(current, "config", None)
        if (
            config is not None
            and callable(getattr(config, "to_dict", None))
            and hasattr(config, "model_type")
        ):
            return current
        queue.extend(current.children())
    return None


def _leaf_params(module: nn.Module) -> "tuple[tuple[str, tuple[int, ...]], ...]":
    """Modules owning parameters directly, in registration order, each shared tensor counted once."""
    seen: set = set()
    out = []
    for name, sub in module.named_modules():
        numels = []
        for p in sub.parameters(recurse=False):
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                numels.append(p.numel())
        if numels:
            out.append((name, tuple(numels)))
    return tuple(out)


def from_module(module: nn.Module) -> ModelSpec:
    """Build a :class:`ModelSpec` from an ``nn.Module``.

    A Hugging Face model (or a module holding one, such as a LightningModule) is read from its config; any
    other module is read structurally: the vocabulary and width from its largest ``nn.Embedding``, the blocks
    from its longest ``nn.ModuleList`` of identical children, the MLP width from the block's down projection
    (a Linear back to the width), the heads from a ``num_heads``/``n_head``/``n_heads`` attribute or an
    ``nn.MultiheadAttention``. Parameters are counted from the module itself (shared tensors once, frozen ones
    excluded).

    Raises:
        ValueError: when a generic module has no blocks or no embedding to read the shapes from.

    Example:
        >>> from torch import nn
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        ...         self.ln1, self.ln2 = nn.LayerNorm(32), nn.LayerNorm(32)
        ...         self.fc1, self.fc2 = nn.Linear(32, 128), nn.Linear(128, 32)
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb = nn.Embedding(100, 32)
        ...         self.blocks = nn.ModuleList(Block() for _ in range(2))
        ...         self.head = nn.Linear(32, 100, bias=False)
        >>> spec = from_module(Net())
        >>> spec.family, spec.num_layers, spec.intermediate_size, spec.num_heads
        ('generic', 2, 128, 4)
    """
    leaves = _leaf_params(module)
    total = sum(n for _, p in leaves for n in p)
    if total == 0:
        raise ValueError(
            f"Expected a module with trainable parameters, got {type(module).__name__} with none."
        )
    hf = _find_hf_model(module)
    if hf is not None:
        spec = from_hf_config(hf.config.to_dict(), name=getattr(hf.config, "model_type", None))
        spec = _replace(spec, num_parameters=total, module_params=leaves)
    else:
        spec = _generic_spec(module, leaves, total)
    return _replace(spec, step_calls_root=step_calls_root(module))


def step_calls_root(module: nn.Module) -> bool:
    """Whether ``module.training_step`` (or a method of the module it calls) calls the module itself, ``self(...)``.

    Under Lightning the DeepSpeed engine's forward runs ``training_step`` (Lightning's forward redirection,
    ``strategies/strategy.py`` ``_ForwardRedirection``), and ZeRO-3 registers a forward pre-hook on that root module
    that resets the parameter trace (DeepSpeed 0.19.8 ``zero/parameter_offload.py`` ``_start_of_forward_hook`` ->
    ``PartitionedParameterCoordinator.reset_step``). A ``self(...)`` inside the step fires it a second time, so
    the recorded trace ends after the root module: the next sub-module invalidates it (``trace_prologue``: "cache
    has only 1 modules") and it never completes. Without a complete trace ``release_sub_module`` frees every
    gathered parameter after each sub-module's forward and backward and nothing is prefetched. Read from the
    source (``ast``); ``False`` when the source is unavailable.

    Example:
        >>> from torch import nn
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


def _replace(spec: ModelSpec, **changes: Any) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, **changes)


def _generic_spec(module: nn.Module, leaves: Any, total: int) -> ModelSpec:
    embeddings = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    blocks: list = []
    for m in module.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(blocks):
            kinds = {type(c) for c in m}
            if len(kinds) == 1 and any(True for _ in m[0].parameters()):
                blocks = list(m)
    if not embeddings or not blocks:
        raise ValueError(
            f"Expected {type(module).__name__} to contain an nn.Embedding and an nn.ModuleList of transformer"
            " blocks to read its shapes from. Fix: pass its Hugging Face config, use method='trace', or pass"
            " the"
            " parameter count for model states only."
        )
    emb = max(embeddings, key=lambda e: e.num_embeddings)
    vocab, d = emb.num_embeddings, emb.embedding_dim
    block = blocks[0]
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    down = [lin for lin in linears if lin.out_features == d and lin.in_features != d]
    inter = down[0].in_features if down else d
    ups = [lin for lin in linears if lin.in_features == d and lin.out_features == inter]
    heads = kv = 0
    for m in block.modules():
        if isinstance(m, nn.MultiheadAttention):
            heads = kv = m.num_heads
        for attr in ("num_heads", "n_head", "n_heads", "num_attention_heads"):
            if not heads and isinstance(getattr(m, attr, None), int):
                heads = getattr(m, attr)
        for attr in ("num_kv_heads", "n_kv_heads", "num_key_value_heads", "n_kv_head"):
            if not kv and isinstance(getattr(m, attr, None), int):
                kv = getattr(m, attr)
    heads = heads or 1
    kv = kv or heads
    norms = [type(m).__name__.lower() for m in block.modules()]
    rms = any("rms" in n for n in norms)
    positions = [e for e in embeddings if e is not emb]
    params = {id(p) for p in module.parameters()}
    out_heads = [m for m in module.modules() if isinstance(m, nn.Linear) and m.out_features == vocab]
    tied = bool(out_heads) and all(h.weight is emb.weight for h in out_heads)
    del params
    return ModelSpec(
        name=type(module).__name__,
        num_parameters=total,
        family="generic",
        hidden_size=d,
        num_layers=len(blocks),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=d // heads,
        intermediate_size=inter,
        vocab_size=vocab,
        tied_embeddings=tied,
        norm="rmsnorm" if rms else "layernorm",
        mlp="swiglu" if len(ups) >= 2 else "gelu",
        attention_bias=any(lin.bias is not None for lin in linears if lin.in_features == d),
        mlp_bias=bool(down) and down[0].bias is not None,
        position="learned" if positions else "rope",
        max_position_embeddings=positions[0].num_embeddings if positions else None,
        module_params=leaves,
        is_hf=False,
        packed_projection_params=sum(
            m.in_proj_weight.numel()
            for m in module.modules()
            if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None and m.in_proj_weight.requires_grad
        ),
    )
