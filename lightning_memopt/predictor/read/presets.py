"""Built-in model presets: the published Hugging Face ``config.json`` of current model families, shipped as files.

Each preset is the complete ``config.json`` of a model on the Hugging Face Hub (values as published there, for
the fields a transformers config class needs), stored in ``lightning_memopt/predictor/read/configs/<name>.json``, so
that ``transformers.AutoConfig.for_model(**get_preset(name))`` builds the exact config and the Auto class named in
its ``architectures`` builds the model (on the meta device: no weights). Two fields of the Hub files are left
out: ``auto_map`` (remote code that is not shipped) and ``_name_or_path``. ``lightning-memopt presets`` lists
them; :data:`CATALOG` holds, for each, the Hub id it was taken from, its kind and its published size.

Example:
    >>> get_preset("llama-3-8b")["num_key_value_heads"]
    8
    >>> preset_for_hub_id("meta-llama/Llama-3.1-8B").name
    'llama-3.1-8b'
"""

import difflib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CATALOG", "CONFIG_DIR", "PRESETS", "Preset", "get_preset", "preset_for_hub_id"]

#: Where the preset ``config.json`` files are (package data).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
KINDS = ("dense", "moe", "encoder", "vision", "multimodal")


@dataclass(frozen=True)
class Preset:
    """One preset of the catalog.

    Attributes:
        name: the short name (``llama-3.1-8b``), also the file name of its config.
        hub_id: the Hugging Face Hub repository its ``config.json`` comes from.
        kind: ``dense`` / ``moe`` decoder, ``encoder``, ``vision`` or ``multimodal`` (vision + language).
        size: the published size as the model card states it (``"46.7B (12.9B active)"``), for people.
    """

    name: str
    hub_id: str
    kind: str
    size: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Expected a preset kind in {KINDS}, got {self.kind!r}.")

    @property
    def path(self) -> Path:
        """The preset's ``config.json`` file."""
        return CONFIG_DIR / f"{self.name}.json"

    def config(self) -> "dict[str, Any]":
        """A fresh copy of the preset's ``config.json`` as a dict."""
        return json.loads(self.path.read_text())


def _presets(kind: str, *rows: "tuple[str, str, str]") -> "tuple[Preset, ...]":
    return tuple(Preset(name, hub_id, kind, size) for name, hub_id, size in rows)


#: Every preset, in the order ``lightning-memopt presets`` lists them.
CATALOG: "tuple[Preset, ...]" = (
    *_presets(
        "dense",
        ("llama-2-7b", "meta-llama/Llama-2-7b-hf", "6.7B"),
        ("llama-3-8b", "meta-llama/Meta-Llama-3-8B", "8.0B"),
        ("llama-3-70b", "meta-llama/Meta-Llama-3-70B", "70.6B"),
        ("llama-3.1-8b", "meta-llama/Llama-3.1-8B", "8.0B"),
        ("llama-3.1-70b", "meta-llama/Llama-3.1-70B", "70.6B"),
        ("llama-3.1-405b", "meta-llama/Llama-3.1-405B", "405B"),
        ("llama-3.2-1b", "meta-llama/Llama-3.2-1B", "1.23B"),
        ("llama-3.2-3b", "meta-llama/Llama-3.2-3B", "3.21B"),
        ("llama-3.3-70b", "meta-llama/Llama-3.3-70B-Instruct", "70.6B"),
        ("mistral-7b", "mistralai/Mistral-7B-v0.1", "7.2B"),
        ("mistral-7b-v0.3", "mistralai/Mistral-7B-v0.3", "7.2B"),
        ("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "0.49B"),
        ("qwen2.5-7b", "Qwen/Qwen2.5-7B", "7.6B"),
        ("qwen2.5-72b", "Qwen/Qwen2.5-72B", "72.7B"),
        ("qwen3-0.6b", "Qwen/Qwen3-0.6B", "0.6B"),
        ("qwen3-8b", "Qwen/Qwen3-8B", "8.2B"),
        ("qwen3-32b", "Qwen/Qwen3-32B", "32.8B"),
        ("gemma-2-2b", "google/gemma-2-2b", "2.6B"),
        ("gemma-2-9b", "google/gemma-2-9b", "9.2B"),
        ("gemma-2-27b", "google/gemma-2-27b", "27.2B"),
        ("gemma-3-1b", "google/gemma-3-1b-pt", "1.0B"),
        ("phi-3-mini", "microsoft/Phi-3-mini-4k-instruct", "3.8B"),
        ("phi-3-medium", "microsoft/Phi-3-medium-4k-instruct", "14B"),
        ("phi-4", "microsoft/phi-4", "14.7B"),
        ("gpt2", "openai-community/gpt2", "124M"),
    ),
    *_presets(
        "moe",
        ("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", "46.7B (12.9B active)"),
        ("mixtral-8x22b", "mistralai/Mixtral-8x22B-v0.1", "141B (39B active)"),
        ("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", "30.5B (3.3B active)"),
        ("qwen3-235b-a22b", "Qwen/Qwen3-235B-A22B", "235B (22B active)"),
        ("deepseek-v2-lite", "deepseek-ai/DeepSeek-V2-Lite", "15.7B (2.4B active)"),
        ("deepseek-v2", "deepseek-ai/DeepSeek-V2", "236B (21B active)"),
        ("deepseek-v3", "deepseek-ai/DeepSeek-V3", "671B (37B active)"),
    ),
    *_presets(
        "encoder",
        ("bert-base", "google-bert/bert-base-uncased", "110M"),
        ("bert-large", "google-bert/bert-large-uncased", "336M"),
        ("roberta-base", "FacebookAI/roberta-base", "125M"),
    ),
    *_presets(
        "vision",
        ("vit-base", "google/vit-base-patch16-224-in21k", "86M"),
        ("vit-huge", "google/vit-huge-patch14-224-in21k", "632M"),
    ),
    *_presets(
        "multimodal",
        ("gemma-3-4b", "google/gemma-3-4b-pt", "4.3B"),
        ("gemma-3-27b", "google/gemma-3-27b-pt", "27.4B"),
    ),
)
_BY_NAME = {preset.name: preset for preset in CATALOG}


class _Configs(Mapping):
    """Preset name -> its ``config.json`` dict, each file read once on first access."""

    def __init__(self) -> None:
        self._loaded: dict[str, dict[str, Any]] = {}

    def __getitem__(self, name: str) -> "dict[str, Any]":
        if name not in self._loaded:
            self._loaded[name] = _BY_NAME[name].config()
        return self._loaded[name]

    def __iter__(self) -> "Iterator[str]":
        return iter(_BY_NAME)

    def __len__(self) -> int:
        return len(_BY_NAME)

    def __contains__(self, name: object) -> bool:
        return name in _BY_NAME


#: Preset name -> ``config.json`` dict (read-only; :func:`get_preset` returns a copy to change).
PRESETS: "Mapping[str, dict[str, Any]]" = _Configs()


def get_preset(name: str) -> "dict[str, Any]":
    """Return a copy of the preset's ``config.json`` dict.

    Raises:
        ValueError: for an unknown name, with the closest names and the full list.

    Example:
        >>> get_preset("Mixtral-8x7B")["num_local_experts"]
        8
    """
    key = name.strip().lower()
    if key not in _BY_NAME:
        close = difflib.get_close_matches(key, list(_BY_NAME), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"Expected a preset in {sorted(_BY_NAME)}, got {name!r}.{hint} Fix: use one of them"
            " (`lightning-memopt presets` lists them), a Hugging Face Hub id, a config.json path, a Hugging Face"
            " config, an nn.Module or a parameter count like '8B'."
        )
    return json.loads(json.dumps(PRESETS[key]))  # a deep copy: nested dicts (rope_scaling) included


def preset_for_hub_id(hub_id: str) -> "Preset | None":
    """The preset whose ``config.json`` was taken from the Hub repository ``hub_id`` (case-insensitive), if any."""
    wanted = hub_id.strip().lower()
    return next((p for p in CATALOG if p.hub_id.lower() == wanted), None)
