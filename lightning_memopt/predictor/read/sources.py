"""What the predictor is asked about, turned into something it can read and trace.

* a parameter count (``8e9``, ``"8B"``): model states only;
* an ``nn.Module`` (a LightningModule, a Hugging Face model, any PyTorch model): read and traced as it is;
* a Hugging Face config (a ``PretrainedConfig``, a dict, a ``config.json`` file or a directory holding one, a
  preset name): the model transformers builds from it, on the meta device (no memory), traced on a batch of the
  requested shape. Nothing is assumed about the family: the model is the one transformers builds.
"""

import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_memopt.predictor.read.reading import ModelReading, from_count, read_model

_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBtT]?)\s*$")
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
#: Auto classes tried, in order, for a config that names no architecture.
_TASKS = (
    "AutoModelForCausalLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForMaskedLM",
    "AutoModelForImageClassification",
    "AutoModelForSequenceClassification",
)
_BUILT: "OrderedDict[str, nn.Module]" = OrderedDict()
_BUILT_MAX = 8


@dataclass(frozen=True)
class Source:
    """A model to predict: its reading and, unless it is a bare count, the module to trace.

    Attributes:
        reading: what the model holds.
        module: the module (``None`` for a parameter count).
        key: a stable identity for models built from a config (their traces may be reused), else ``None``.
    """

    reading: ModelReading
    module: "nn.Module | None" = None
    key: "str | None" = None

    @property
    def device(self) -> "str | None":
        """The accelerator type the module's parameters are on (``None``: no module, or on the CPU or meta device)."""
        first = next(iter(self.module.parameters()), None) if self.module is not None else None
        return None if first is None or first.device.type in ("cpu", "meta") else first.device.type


def resolve_source(model: Any) -> Source:
    """Turn any accepted ``model`` argument into a :class:`Source`.

    Raises:
        ValueError: an unknown name, an unreadable or incomplete config, a non-positive count.
        TypeError: any other type.

    Example:
        >>> resolve_source("8B").reading.num_parameters
        8000000000
        >>> resolve_source({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        ...                 "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}).module.device
        device(type='meta')
    """
    if isinstance(model, Source):
        return model
    if isinstance(model, ModelReading):
        return Source(model)
    if isinstance(model, bool):
        raise TypeError(f"Expected a model (config, nn.Module or parameter count), got {model!r}.")
    if isinstance(model, (int, float)):
        return Source(from_count(model))
    if isinstance(model, nn.Module):
        return Source(read_model(model), model)
    config = config_of(model)
    if config is not None:
        return from_config(config, name=_name_of(model))
    if isinstance(model, (str, os.PathLike)):
        return _from_text(os.fspath(model))
    raise TypeError(
        f"Expected a Hugging Face config (object, dict or path), a preset name, an nn.Module or a parameter count,"
        f" got {type(model).__name__}. Fix: pass e.g. AutoConfig.from_pretrained(...), the model itself, or '8B'."
    )


def resolve_model(model: Any) -> ModelReading:
    """What any accepted ``model`` argument holds (see :func:`resolve_source`).

    Example:
        >>> resolve_model("llama-3-8b").num_parameters
        8030261248
    """
    return resolve_source(model).reading


def _name_of(model: Any) -> "str | None":
    """A preset's name, or the folder a ``config.json`` lies in."""
    from lightning_memopt.predictor.read.presets import PRESETS

    if not isinstance(model, (str, os.PathLike)):
        return None
    text = os.fspath(model)
    if text.strip().lower() in PRESETS:
        return text.strip().lower()
    if not os.path.exists(text):  # a Hub id
        return text
    path = text if os.path.isdir(text) else os.path.dirname(os.path.abspath(text))
    return os.path.basename(path) or None


def _from_text(text: str) -> Source:
    """A parameter count (``"8B"``, ``"7.5e9"``); anything else is an unknown name."""
    from lightning_memopt.predictor.read.presets import PRESETS

    match = _COUNT.match(text)
    if match:
        return Source(from_count(float(match.group(1)) * _SUFFIX[match.group(2).lower()]))
    if text.endswith(".json") or os.sep in text:
        raise ValueError(f"Expected an existing config.json, got {text!r} (no such file). Fix: check the path.")
    raise ValueError(
        f"Expected a preset in {sorted(PRESETS)}, a config.json path or a parameter count like '8B' or '7.5e9',"
        f" got {text!r}."
    )


def from_config(config: "dict[str, Any]", name: "str | None" = None, prepare: Any = None, label: str = "") -> Source:
    """The model transformers builds from ``config`` (a ``config.json`` dict), on the meta device.

    Built models are kept (a few, least recently used first out): a planner's many estimates build it once.

    Args:
        config: the ``config.json`` dict.
        name: the model's name in the estimate (default: its ``model_type``).
        prepare: ``module -> module`` applied to a new build before it is kept (adapters, kernels); ``label`` names
            it in the key, so that each preparation is kept apart.
        label: see ``prepare``.

    Raises:
        ValueError: no ``model_type``, one transformers does not know, or a config it cannot build.
    """
    key = json.dumps(config, sort_keys=True, default=str) + (f"|{label}" if label else "")
    module = _BUILT.get(key)
    if module is None:
        module = _build(config)
        module = prepare(module) if prepare is not None else module
        _BUILT[key] = module
        while len(_BUILT) > _BUILT_MAX:
            _BUILT.popitem(last=False)
    _BUILT.move_to_end(key)
    return Source(read_model(module, name=name or str(config.get("model_type"))), module, key)


def config_of(model: Any) -> "dict[str, Any] | None":
    """The ``config.json`` dict of a config-like ``model`` argument (preset, path, dict, config object), else
    ``None`` (a module or a count)."""
    from lightning_memopt.predictor.read.presets import PRESETS, get_preset

    if isinstance(model, dict):
        return model
    if callable(getattr(model, "to_dict", None)) and hasattr(model, "model_type") and not isinstance(model, nn.Module):
        return model.to_dict()
    if isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        if text.strip().lower() in PRESETS:
            return get_preset(text)
        path = os.path.join(text, "config.json") if os.path.isdir(text) else text
        if os.path.isfile(path):
            with open(path) as fh:
                try:
                    return json.load(fh)
                except json.JSONDecodeError as err:
                    raise ValueError(f"Expected {path!r} to be a JSON config, but it does not parse: {err}.") from None
        from lightning_memopt.predictor.read.hub import is_hub_id, load_hub_config

        if is_hub_id(text) and not os.path.exists(text):  # a Hub id: its config.json, through transformers' cache
            return load_hub_config(text).to_dict()
    return None


def _tasks(cfg: Any) -> "tuple[str, ...]":
    """The task classes to try, in order: an encoder-decoder trains as sequence-to-sequence (BART's causal-LM class is
    its decoder alone); an encoder (not ``is_decoder``) with a masked-LM head as a masked LM (BERT's causal-LM head
    is for ``is_decoder=True``); anything else as a causal LM first."""
    from transformers import MODEL_FOR_MASKED_LM_MAPPING

    first = None
    if getattr(cfg, "is_encoder_decoder", False):
        first = "AutoModelForSeq2SeqLM"
    elif not getattr(cfg, "is_decoder", False) and type(cfg) in MODEL_FOR_MASKED_LM_MAPPING:
        first = "AutoModelForMaskedLM"
    return _TASKS if first is None else (first, *(t for t in _TASKS if t != first))


def _base_model_class(cfg: Any) -> "type | None":
    """The headless base model class of a config (what ``AutoModel`` builds), ``None`` if there is none."""
    from transformers import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(cfg)]
    except (KeyError, ValueError):
        return None


def _build(config: "dict[str, Any]") -> nn.Module:
    import transformers

    model_type = config.get("model_type")
    if not model_type:
        raise ValueError(
            f"Expected a Hugging Face config with a `model_type`, got keys {sorted(config)[:12]}."
            " Fix: pass the model's config.json (it names its model_type), or the model itself."
        )
    rest = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **rest)
    except (ValueError, KeyError) as err:
        raise ValueError(
            f"Expected a model_type that transformers {transformers.__version__} knows, got {model_type!r} ({err})."
            " Fix: upgrade transformers, or build the model yourself and pass it (an nn.Module)."
        ) from None
    # a headless architecture (``ViTModel``, ``BertModel``: the base model, no loss) trains with a task head: the
    # first of _TASKS that transformers has for the model type
    headless = _base_model_class(cfg)
    classes = [getattr(transformers, a, None) for a in (cfg.architectures or [])]
    named = [c for c in classes if c is not None and c is not headless]
    candidates = named + [getattr(transformers, t) for t in _tasks(cfg)]
    errors = []
    for cls in candidates:
        try:
            with torch.device("meta"):
                # an Auto class picks the model class; a model class builds itself (``_from_config``). The weights
                # are fp32, as a model is trained: 16-bit engines and *-true precisions cast them, autocast not.
                model = cls.from_config(cfg) if cls.__name__.startswith("Auto") else cls._from_config(cfg)
                return model.float()
        except ValueError as err:  # an Auto class without this model_type: try the next task
            errors.append(f"{getattr(cls, '__name__', cls)}: {str(err).splitlines()[0][:120]}")
    raise ValueError(
        f"Expected transformers to build a trainable model from the {model_type!r} config, got none of"
        f" {[getattr(c, '__name__', c) for c in candidates]} ({'; '.join(errors[:3])})."
        " Fix: build the model yourself and pass it (an nn.Module) with an example_batch."
    )
