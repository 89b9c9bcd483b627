"""Built-in model presets: the published Hugging Face ``config.json`` shapes of popular models.

Values are copied from the models' ``config.json`` on the Hugging Face Hub (meta-llama/Llama-2-7b-hf,
meta-llama/Meta-Llama-3-8B, meta-llama/Meta-Llama-3-70B, mistralai/Mistral-7B-v0.1, Qwen/Qwen2.5-7B,
openai-community/gpt2); only the fields that decide memory are kept.
"""

from typing import Any

PRESETS: "dict[str, dict[str, Any]]" = {
    "llama-2-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "llama-3-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "llama-3-70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "mistral-7b": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_inner": None,
        "vocab_size": 50257,
        "n_positions": 1024,
        "tie_word_embeddings": True,
        "activation_function": "gelu_new",
    },
}


def get_preset(name: str) -> "dict[str, Any]":
    """Return a copy of the preset's config dict.

    Raises:
        ValueError: for an unknown name, listing the known ones.

    Example:
        >>> get_preset("llama-3-8b")["num_key_value_heads"]
        8
    """
    key = name.strip().lower()
    if key not in PRESETS:
        raise ValueError(
            f"Expected a preset in {sorted(PRESETS)}, got {name!r}. Fix: use one of them, a config.json path,"
            " a Hugging Face config, an nn.Module or a parameter count like '8B'."
        )
    return dict(PRESETS[key])
