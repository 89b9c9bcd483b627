"""The preset catalog: complete Hugging Face configs whose models have the published sizes."""

import fnmatch

import pytest
import torch
import transformers

from helpers import ROOT
from lightning_memopt.predictor import resolve_model
from lightning_memopt.predictor.read.presets import (
    CATALOG,
    CONFIG_DIR,
    PRESETS,
    Preset,
    get_preset,
    preset_for_hub_id,
)

# Published sizes, from the model cards (or the technical report / paper they cite), in parameters.
PUBLISHED = {
    "llama-2-7b": 6.74e9,  # Hub model page of meta-llama/Llama-2-7b-hf (the card says "7B")
    "llama-3-8b": 8e9,  # Llama 3 card: 8B
    "llama-3-70b": 70e9,  # Llama 3 card: 70B
    "llama-3.1-8b": 8e9,  # Llama 3.1 card: 8B
    "llama-3.1-70b": 70e9,  # Llama 3.1 card: 70B
    "llama-3.1-405b": 405e9,  # Llama 3.1 card: 405B
    "llama-3.2-1b": 1.23e9,  # Llama 3.2 card: 1B (1.23B)
    "llama-3.2-3b": 3.21e9,  # Llama 3.2 card: 3B (3.21B)
    "llama-3.3-70b": 70e9,  # Llama 3.3 card: 70B
    "mistral-7b": 7.3e9,  # Mistral 7B announcement: "a 7.3B parameter model"
    "mistral-7b-v0.3": 7.3e9,  # same architecture, vocabulary 32768
    "mixtral-8x7b": 46.7e9,  # Mixtral announcement: 46.7B total, 12.9B per token
    "mixtral-8x22b": 141e9,  # Mixtral 8x22B announcement: 141B total, 39B active
    "qwen2.5-0.5b": 0.49e9,  # Qwen2.5-0.5B card: 0.49B
    "qwen2.5-7b": 7.61e9,  # Qwen2.5-7B card: 7.61B
    "qwen2.5-72b": 72.7e9,  # Qwen2.5-72B card: 72.7B
    "qwen3-0.6b": 0.6e9,  # Qwen3-0.6B card: 0.6B
    "qwen3-8b": 8.2e9,  # Qwen3-8B card: 8.2B
    "qwen3-32b": 32.8e9,  # Qwen3-32B card: 32.8B
    "qwen3-30b-a3b": 30.5e9,  # Qwen3-30B-A3B card: 30.5B total, 3.3B activated
    "qwen3-235b-a22b": 235e9,  # Qwen3-235B-A22B card: 235B total, 22B activated
    "gemma-2-2b": 2_024_517_888 + 590_118_912,  # Gemma 2 report, Table 2: non-embedding + embedding
    "gemma-2-9b": 8_324_201_984 + 917_962_752,
    "gemma-2-27b": 26_047_480_320 + 1_180_237_824,
    "gemma-3-1b": 302e6 + 698e6,  # Gemma 3 report, Table 1: vision + embedding + non-embedding
    "gemma-3-4b": 417e6 + 675e6 + 3_209e6,
    "gemma-3-27b": 417e6 + 1_416e6 + 25_600e6,
    "phi-3-mini": 3.8e9,  # Phi-3-mini card: 3.8B
    "phi-3-medium": 14e9,  # Phi-3-medium card: 14B
    "phi-4": 14.7e9,  # microsoft/phi-4 Hub model page: 14.7B params (the report says "14B")
    "deepseek-v2-lite": 15.7e9,  # DeepSeek-V2-Lite card: 15.7B total, 2.4B activated
    "deepseek-v2": 236e9,  # DeepSeek-V2 card: 236B total, 21B activated
    "deepseek-v3": 671e9,  # DeepSeek-V3 card: 671B total (685B on the Hub with the multi-token-prediction module)
    "gpt2": 124e6,  # GPT-2 card: 124M
    "bert-base": 110e6,  # BERT paper / card: 110M
    "bert-large": 336e6,  # bert-large-uncased card: 336M
    "roberta-base": 125e6,  # RoBERTa card: 125M
    "vit-base": 86e6,  # ViT paper, Table 1: ViT-Base 86M
    "vit-huge": 632e6,  # ViT paper, Table 1: ViT-Huge 632M
}


def test_every_preset_has_a_published_size_and_a_file():
    assert set(PRESETS) == set(PUBLISHED)
    assert {path.stem for path in CONFIG_DIR.glob("*.json")} == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_builds_the_published_model_on_the_meta_device(name):
    config_dict = get_preset(name)
    config = transformers.AutoConfig.for_model(**config_dict)
    assert config.model_type == config_dict["model_type"]
    model_class = getattr(transformers, config_dict["architectures"][0])
    with torch.device("meta"):
        model = model_class(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(PUBLISHED[name], rel=0.01), f"{name}: {count:,}"


# the Hub's counts of the six original presets, which the predictor reads exactly today
EXACT = {"llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496,
         "mistral-7b": 7_241_732_096, "qwen2.5-7b": 7_615_616_512, "gpt2": 124_439_808}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXACT))
def test_original_presets_keep_their_parameter_counts(name):
    assert resolve_model(name).num_parameters == EXACT[name]


def test_get_preset_returns_an_independent_copy():
    first = get_preset("llama-3.1-8b")
    first["rope_scaling"]["factor"] = 1.0
    assert get_preset("llama-3.1-8b")["rope_scaling"]["factor"] == 8.0


def test_unknown_preset_lists_the_known_ones_and_the_closest():
    with pytest.raises(ValueError, match="llama-3-8b") as err:
        get_preset("llama-3.1-9b")
    assert "Did you mean 'llama-3.1-8b'" in str(err.value)
    with pytest.raises(ValueError, match="qwen2.5-7b"):
        resolve_model("not-a-model")


def test_hub_ids_are_unique_and_found_back():
    assert len({p.hub_id.lower() for p in CATALOG}) == len(CATALOG)
    assert preset_for_hub_id("MISTRALAI/Mixtral-8x7B-v0.1").name == "mixtral-8x7b"
    assert preset_for_hub_id("nobody/nothing") is None
    with pytest.raises(ValueError, match="kind"):
        Preset("x", "a/b", "sparse", "1B")


def test_the_config_files_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = ROOT / "lightning_memopt"
    files = [str(p.relative_to(package)) for p in CONFIG_DIR.glob("*.json")]
    assert all(any(fnmatch.fnmatch(f, pattern) for pattern in data["lightning_memopt"]) for f in files)
