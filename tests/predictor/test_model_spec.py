import json

import pytest
from torch import nn

from lightning_memopt.predictor.model_spec import ModelSpec, resolve_model
from transforms._models import hf_config, hf_model, plain_model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_config_count_equals_the_built_model(kind):
    cfg = hf_config(kind, tie_word_embeddings=(kind == "qwen2"))
    model = hf_model(kind, tie_word_embeddings=(kind == "qwen2"))
    real = sum(p.numel() for p in model.parameters())
    assert resolve_model(cfg).num_parameters == real
    assert resolve_model(cfg.to_dict()).num_parameters == real
    assert resolve_model(model).num_parameters == real


def test_gpt2_config_and_tied_embeddings():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=128)
    spec = resolve_model(cfg)
    assert spec.tied_embeddings and spec.norm == "layernorm" and spec.mlp == "gelu"
    assert spec.num_parameters == sum(p.numel() for p in GPT2LMHeadModel(cfg).parameters())


def test_config_json_path_and_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config("llama").to_dict()))
    assert (
        resolve_model(tmp_path).num_parameters == resolve_model(str(tmp_path / "config.json")).num_parameters
    )


def test_lightning_module_holding_a_hf_model_is_read_from_its_config():
    inner = hf_model("qwen2")

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = inner

    spec = resolve_model(Wrapper())
    assert spec.family == "llama" and spec.num_kv_heads == 2 and spec.attention_bias


def test_plain_module_is_read_structurally():
    spec = resolve_model(plain_model(layers=3))
    assert (spec.family, spec.num_layers, spec.hidden_size, spec.intermediate_size, spec.num_heads) == (
        "generic",
        3,
        64,
        256,
        4,
    )
    assert spec.norm == "rmsnorm" and spec.mlp == "gelu" and spec.vocab_size == 256


@pytest.mark.parametrize(
    ("text", "count"), [("8B", 8_000_000_000), ("7.5e9", 7_500_000_000), ("125M", 125_000_000)]
)
def test_parameter_counts(text, count):
    spec = resolve_model(text)
    assert spec.num_parameters == count and not spec.has_structure
    assert resolve_model(float(count)).num_parameters == count


def test_bad_models_raise_clear_errors():
    with pytest.raises(ValueError, match="intermediate_size"):
        resolve_model(
            {
                "model_type": "llama",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "vocab_size": 10,
            }
        )
    with pytest.raises(ValueError, match="positive"):
        resolve_model(-5)
    with pytest.raises(TypeError):
        resolve_model([1, 2])
    with pytest.raises(ValueError, match="ModuleList"):
        resolve_model(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="divisible"):
        ModelSpec(name="x", num_parameters=10, family="llama", num_heads=6, num_kv_heads=4)
    spec = resolve_model("gpt2")
    assert resolve_model(spec) is spec


def _step_modules():
    from transforms._models import plain_model

    class CallsItself(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = plain_model(layers=2)

        def forward(self, ids):
            return self.net(ids)

        def training_step(self, batch, batch_idx):
            return self._shared(batch)

        def _shared(self, batch):
            return self(batch).float().mean()  # the root module called inside the step, via a helper

    class CallsChild(CallsItself):
        def training_step(self, batch, batch_idx):
            return self.net(batch).float().mean()

    return CallsItself(), CallsChild()


def test_step_calls_root_is_read_from_the_training_step():
    """A ``self(...)`` in the step (directly or through a helper method) re-enters DeepSpeed's root forward hook."""
    calls_itself, calls_child = _step_modules()
    assert resolve_model(calls_itself).step_calls_root
    assert not resolve_model(calls_child).step_calls_root
    assert not resolve_model(plain_model(layers=2)).step_calls_root  # no training_step at all


def test_packed_attention_projections_are_counted_for_zero3():
    """``packed_projection_params``: nn.MultiheadAttention's packed in_proj weights, which ZeRO-3 keeps gathered into
    backward; the analytic estimate adds them to what is gathered at ZeRO-3 only."""
    from lightning_memopt.predictor.api import estimate_memory

    model = plain_model(layers=2)
    spec = resolve_model(model)
    packed = sum(m.in_proj_weight.numel() for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    assert spec.packed_projection_params == packed == 2 * 3 * 64 * 64
    assert resolve_model(hf_model("llama", layers=2)).packed_projection_params == 0
    kw = dict(world_size=2, micro_batch_size=2, seq_len=32, precision="32-true")
    zero3 = estimate_memory(spec, zero=3, **kw)
    assert zero3.details["pinned_projection_bytes"] == 4 * packed
    assert "pinned_projection_bytes" not in estimate_memory(spec, zero=2, **kw).details
