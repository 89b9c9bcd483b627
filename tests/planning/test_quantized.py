"""A quantized model: inference (weights + KV cache) and QLoRA (the traced LoRA model on a quantized base)."""

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_memopt.planning import estimate_memory
from lightning_memopt.planning.quantized import estimate_quantized
from lightning_memopt.predictor.account.quantization import quantized_weight_bytes

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # fmt: skip
CONFIG = {"model_type": "llama", **TINY}


def test_inference_adds_kv_cache_and_last_logits():
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    est = estimate_quantized(model, "q8_0", micro_batch_size=3, seq_len=100)
    kv = 2 * 2 * 3 * 100 * (2 * 16) * 2  # K and V x layers x batch x tokens x kv width x bf16
    assert est.buffers == kv and est.details["kv_cache_bytes"] == kv
    assert est.parameters == quantized_weight_bytes(model, "q8_0")
    assert est.logits == 3 * 256 * 4 and est.gradients == est.optimizer_states == 0
    assert est.total == sum(est.to_dict()[k] for k in ("parameters", "buffers", "activations", "logits"))
    longer = estimate_quantized(model, "q8_0", micro_batch_size=3, seq_len=200)
    assert longer.buffers == 2 * kv


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_qlora_holds_the_quantized_base_and_fp32_adapters_and_trains_the_adapters_only(fmt):
    est = estimate_quantized(CONFIG, fmt, mode="qlora", micro_batch_size=2, seq_len=32, lora_rank=8)
    adapters = est.details["lora_parameters"]
    # LoRA on every linear of both blocks: q 64->64, k 64->32, v 64->32, o 64->64, gate/up 64->128, down 128->64
    assert adapters == 2 * 8 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert est.parameters == quantized_weight_bytes(CONFIG, fmt) + 4 * adapters
    assert est.optimizer_states == 8 * adapters  # AdamW's fp32 states of the adapters alone
    full = estimate_memory(CONFIG, engine="torch", micro_batch_size=2, seq_len=32)
    assert est.total < full.total and est.activations > 0


def test_qlora_with_an_8_bit_optimizer_and_bad_input():
    adamw = estimate_quantized(CONFIG, "nf4", mode="qlora", seq_len=32)
    eight = estimate_quantized(CONFIG, "nf4", mode="qlora", seq_len=32, optimizer="adamw8bit")
    assert eight.optimizer_states == 2 * eight.details["lora_parameters"] < adamw.optimizer_states
    with pytest.raises(ValueError, match="'inference' or 'qlora'"):
        estimate_quantized(1e9, "q8_0", mode="train")
    with pytest.raises(ValueError, match="seq_len"):
        estimate_quantized(CONFIG, "nf4", mode="qlora")
    with pytest.raises(ValueError, match="config or a preset"):
        estimate_quantized(LlamaForCausalLM(LlamaConfig(**TINY)), "nf4", mode="qlora", seq_len=32)
