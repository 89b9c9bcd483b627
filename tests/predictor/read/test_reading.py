import pytest
import torch
from predictor._modules import CNN, hf_from_config, lora
from torch import nn
from transforms._models import plain_model

from lightning_memopt.core.modules import tensor_attributes
from lightning_memopt.predictor.read.reading import from_count, read_model, step_calls_root


def test_every_parameter_with_its_dtype_and_whether_it_trains():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    model[1].to(torch.bfloat16)
    reading = read_model(model)
    assert [(p.name, p.numel, p.dtype, p.trainable) for p in reading.params] == [
        ("0.weight", 32, torch.float32, False),
        ("0.bias", 8, torch.float32, False),
        ("1.weight", 16, torch.bfloat16, True),
        ("1.bias", 2, torch.bfloat16, True),
    ]
    assert (reading.num_parameters, reading.trainable_parameters, reading.frozen_parameters) == (58, 18, 40)
    assert reading.param_bytes() == 40 * 4 + 18 * 2
    assert reading.param_bytes(torch.bfloat16, trainable=False) == 40 * 2


def test_tied_weights_are_counted_once():
    model = hf_from_config("llama", tie_word_embeddings=True)
    reading = read_model(model)
    assert reading.num_parameters == sum(p.numel() for p in model.parameters())  # parameters() dedupes
    assert not any(p.name == "lm_head.weight" for p in reading.params)


def test_integer_weights_keep_their_dtype_when_an_engine_casts():
    model = nn.Module()
    model.quantized = nn.Parameter(torch.zeros(64, dtype=torch.int8), requires_grad=False)
    model.adapter = nn.Linear(4, 4)
    reading = read_model(model)
    assert reading.param_bytes(torch.bfloat16) == 64 * 1 + 20 * 2


def test_buffers_and_plain_tensor_attributes_are_read():
    cnn = CNN()
    names = {b.name for b in read_model(cnn).buffers}
    assert {"net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked"} <= names
    layer = nn.Linear(2, 2)
    layer.table = torch.zeros(10)
    reading = read_model(layer)
    assert [(b.name, b.attribute, b.floating) for b in reading.buffers] == [("table", True, False)]
    assert reading.buffer_bytes(torch.bfloat16) == 40  # an attribute is not cast by an engine
    assert list(tensor_attributes(nn.Linear(2, 2))) == []


def test_a_lora_model_reads_its_frozen_base():
    base = hf_from_config("llama")
    total = sum(p.numel() for p in base.parameters())
    reading = read_model(lora(base, rank=4, targets=("q_proj", "v_proj")))
    # q_proj 64 -> 64 and v_proj 64 -> 32 per layer: r (in + out) each
    adapters = 2 * 4 * ((64 + 64) + (64 + 32))
    assert reading.trainable_parameters == adapters and reading.frozen_parameters == total


def test_blocks_follow_the_one_rule():
    assert read_model(hf_from_config("t5")).blocks == (
        "encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1",
    )  # fmt: skip
    assert read_model(plain_model(layers=3)).blocks == ("blocks.0", "blocks.1", "blocks.2")


def test_count_and_errors():
    reading = from_count(8e9)
    assert reading.num_parameters == 8_000_000_000 and not reading.traceable
    for bad in (0, -5, float("nan"), True):
        with pytest.raises(ValueError, match="positive parameter count"):
            from_count(bad)
    with pytest.raises(ValueError, match="with none"):
        read_model(nn.ReLU())
    with pytest.raises(TypeError, match="nn.Module"):
        read_model("gpt2")


def _step_modules():
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
    assert read_model(calls_itself).step_calls_root and step_calls_root(calls_itself)
    assert not read_model(calls_child).step_calls_root
    assert not read_model(plain_model(layers=2)).step_calls_root  # no training_step at all
