import json

import pytest
import torch
from predictor._modules import hf_from_config, tiny_config
from torch import nn

from lightning_memopt.predictor import predict
from lightning_memopt.predictor.read.sources import resolve_model, resolve_source
from lightning_memopt.predictor.trace.batch import synthetic_batch


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt_neox", "mixtral", "t5", "bert", "vit", "deepseek_v3"])
def test_a_config_is_the_model_transformers_builds(model_type):
    """No family formula: the parameters of a config are those of the model transformers builds from it."""
    real = hf_from_config(model_type)
    source = resolve_source(tiny_config(model_type))
    assert source.module.device.type == "meta" and type(source.module) is type(real)
    assert source.reading.num_parameters == sum(p.numel() for p in real.parameters())
    assert resolve_model(real.config).num_parameters == source.reading.num_parameters  # a config object too


@pytest.mark.parametrize(
    ("model_type", "architecture", "trained_as"),
    [("vit", "ViTModel", "ViTForImageClassification"), ("bert", "BertModel", "BertForMaskedLM"),
     ("llama", "LlamaModel", "LlamaForCausalLM"), ("t5", "T5Model", "T5ForConditionalGeneration"),
     ("bert", None, "BertForMaskedLM"), ("bert", "BertForSequenceClassification", "BertForSequenceClassification")],
)  # fmt: skip
def test_a_headless_config_trains_with_a_task_head(model_type, architecture, trained_as):
    """A base-model architecture computes no loss: the config is built with the task head it trains with (an
    encoder's masked-LM head before BERT's decoder-only causal head); a task architecture is kept."""
    config = tiny_config(model_type, architectures=[architecture] if architecture else None)
    source = resolve_source(config)
    assert type(source.module).__name__ == trained_as
    batch = synthetic_batch(source.module, 2, None if model_type == "vit" else 16)
    assert predict(config, engine="torch", precision="32-true", example_batch=batch).activations > 0


def test_config_json_path_directory_and_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config("llama")))
    by_dir, by_file = resolve_model(tmp_path), resolve_model(str(tmp_path / "config.json"))
    assert by_dir.num_parameters == by_file.num_parameters > 0
    assert resolve_model("llama-3-8b").num_parameters == 8_030_261_248


def test_built_models_are_reused():
    assert resolve_source(tiny_config("llama")).module is resolve_source(tiny_config("llama")).module


@pytest.mark.parametrize(("text", "count"), [("8B", 8_000_000_000), ("7.5e9", 7_500_000_000), ("125M", 125_000_000)])
def test_parameter_counts(text, count):
    assert resolve_source(text).module is None and resolve_model(text).num_parameters == count
    assert resolve_model(float(count)).num_parameters == count


def test_bad_models_raise_clear_errors():
    with pytest.raises(ValueError, match="model_type"):
        resolve_model({"hidden_size": 64})
    with pytest.raises(ValueError, match="transformers .* knows"):
        resolve_model({"model_type": "not-a-family-yet", "hidden_size": 64})
    with pytest.raises(ValueError, match="positive"):
        resolve_model(-5)
    with pytest.raises(TypeError, match="Fix"):
        resolve_model([1, 2])
    with pytest.raises(ValueError, match="preset"):
        resolve_model("not-a-model")


@pytest.mark.parametrize(
    ("model_type", "keys", "shapes"),
    [
        ("llama", ("input_ids", "labels"), ((2, 16), (2, 16))),
        ("t5", ("input_ids", "labels"), ((2, 16), (2, 16))),
        ("bert", ("input_ids", "labels"), ((2, 16), (2, 16))),
        ("vit", ("pixel_values", "labels"), ((2, 3, 32, 32), (2,))),
    ],
)
def test_synthetic_batches_have_the_shape_each_task_trains_on(model_type, keys, shapes):
    module = resolve_source(tiny_config(model_type)).module
    batch = synthetic_batch(module, 2, None if model_type == "vit" else 16)
    assert tuple(batch) == keys and tuple(tuple(t.shape) for t in batch.values()) == shapes
    real = hf_from_config(model_type)
    assert real(**batch).loss.requires_grad  # the real model trains on it


def test_synthetic_batch_errors():
    with pytest.raises(ValueError, match="seq_len"):
        synthetic_batch(resolve_source(tiny_config("vit")).module, 2, 16)
    with pytest.raises(ValueError, match="example_batch"):
        synthetic_batch(nn.Linear(2, 2), 2, 16)
    classifier = resolve_source(tiny_config("bert", architectures=["BertForSequenceClassification"])).module
    batch = synthetic_batch(classifier, 3, 8)
    assert batch["labels"].shape == (3,) and batch["labels"].dtype == torch.long
