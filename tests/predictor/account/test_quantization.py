"""Quantized weight bytes: GGUF block structs, tool conventions, the lecture's 8B Q8_0 figure."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lightning_memopt.predictor.account.quantization import (
    QUANTIZATIONS,
    TensorShape,
    model_tensors,
    quantized_weight_bytes,
    tensor_bytes,
)

LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def _meta_llama(**overrides):
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**{**LLAMA31_8B, **overrides}))


def test_gguf_block_sizes_match_ggml_structs():
    # ggml-common.h: block_q8_0 34 B / 32, block_q4_0 18 B / 32, block_q4_K 144 B / 256, block_q6_K 210 B / 256
    for name, block, block_bytes in (("q8_0", 32, 34), ("q4_0", 32, 18), ("q4_k", 256, 144), ("q6_k", 256, 210)):
        assert tensor_bytes(TensorShape("w", "linear", 3, 4 * block), name) == 3 * 4 * block_bytes
        assert QUANTIZATIONS[name].bits_per_weight == pytest.approx(8 * block_bytes / block)


def test_llama31_8b_q8_0_exact_figure():
    """The lecture's "~8 GB" for Meta-Llama-3.1-8B-Instruct-Q8_0.gguf, exactly."""
    model = _meta_llama()
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    weights_2d = 8_030_261_248 - 65 * 4096  # 65 RMSNorm vectors stay F32
    expected = weights_2d * 34 // 32 + 65 * 4096 * 4
    assert quantized_weight_bytes(model, "q8_0") == expected == 8_532_934_656
    assert quantized_weight_bytes(model, "q8_0") / 2**30 == pytest.approx(7.947, abs=1e-3)


def test_gguf_output_matrix_is_q6_k_except_for_q8_0():
    model = _meta_llama()
    tensors = {t.name: t for t in model_tensors(model)}
    lm_head, embed = tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]
    assert (lm_head.kind, embed.kind) == ("output", "embedding")
    assert tensor_bytes(lm_head, "q4_0") == 128256 * (4096 // 256) * 210  # Q6_K (llama-quantize's rule)
    assert tensor_bytes(embed, "q4_0") == 128256 * (4096 // 32) * 18  # token embeddings keep the format
    assert tensor_bytes(lm_head, "q8_0") == 128256 * (4096 // 32) * 34


def test_tied_embedding_is_the_output_matrix():
    tensors = model_tensors(LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True)))
    embed = [t for t in tensors if t.kind == "embedding"]
    assert len(embed) == 1 and embed[0].tied and not any(t.kind == "output" for t in tensors)
    # the output rule asks for Q6_K; a row of 64 is no multiple of 256, so llama.cpp falls back to Q8_0
    assert tensor_bytes(embed[0], "q4_0") == 256 * (64 // 32) * 34


def test_row_not_multiple_of_block_falls_back_like_llama_cpp():
    odd = TensorShape("w", "linear", 10, 96)  # 96 % 256 != 0, 96 % 32 == 0
    assert tensor_bytes(odd, "q4_k") == 10 * 3 * 22  # Q4_K -> Q5_0
    assert tensor_bytes(TensorShape("w", "linear", 10, 40), "q8_0") == 10 * 40 * 2  # no block fits: F16


def test_bitsandbytes_and_gptq_keep_embeddings_norms_and_lm_head_16_bit():
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False))
    tensors = model_tensors(model)
    linear = [t for t in tensors if t.kind == "linear"]
    assert len(linear) == 2 * 7 and all(t.count == 1 for t in tensors)
    other = sum(p.numel() for p in model.parameters()) - sum(t.numel for t in linear)
    lin = sum(t.numel for t in linear)
    rows = sum(t.rows for t in linear)
    assert quantized_weight_bytes(model, "int8") == lin + 4 * rows + 2 * other  # LLM.int8: int8 + fp32 SCB/row
    assert quantized_weight_bytes(model, "nf4") == sum(t.numel // 2 + 4 * (t.numel // 64) for t in linear) + 2 * other
    groups = sum(t.rows * (t.cols // 128 or 1) for t in linear)  # 64 or 128 columns: one group of 128
    assert quantized_weight_bytes(model, "int4") == lin // 2 + 2 * groups + groups // 2 + 2 * other


def test_gpt2_conv1d_counts_as_linear_with_its_transposed_shape():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=32))
    tensors = {t.name: t for t in model_tensors(model)}
    c_attn = tensors["transformer.h.0.attn.c_attn.weight"]
    assert (c_attn.kind, c_attn.rows, c_attn.cols) == ("linear", 3 * 64, 64)
    assert tensors["transformer.wte.weight"].tied
    assert sum(t.numel * t.count for t in tensors.values()) == sum(p.numel() for p in model.parameters())


def test_double_quantization_is_smaller_and_nominal_bits_hold_on_large_matrices():
    big = TensorShape("w", "linear", 4096, 4096)
    bits = {name: 8 * tensor_bytes(big, name) / big.numel for name in QUANTIZATIONS}
    assert bits["nf4-dq"] < bits["int4"] < bits["nf4"] == 4.5
    for name, fmt in QUANTIZATIONS.items():
        assert bits[name] == pytest.approx(fmt.bits_per_weight, abs=0.01), name


def test_bare_parameter_count_uses_average_bits():
    assert quantized_weight_bytes(7.5e9, "q4_0") == 7.5e9 * 4.5 / 8
    with pytest.raises(ValueError, match="positive parameter count"):
        quantized_weight_bytes(0, "q8_0")


def test_unknown_quantization_lists_known_names():
    with pytest.raises(ValueError, match=r"Expected a quantization in \[.*'q8_0'.*got 'q3_x'"):
        quantized_weight_bytes(1e9, "q3_x")


def test_presets_and_config_paths_count_like_the_built_model(tmp_path):
    assert quantized_weight_bytes("llama-3-8b", "q8_0") == 8_532_934_656  # Llama-3.1-8B has the same shapes
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=32))
    path = tmp_path / "config.json"
    path.write_text(gpt2.config.to_json_string())
    assert quantized_weight_bytes(str(path), "q4_0") == quantized_weight_bytes(gpt2, "q4_0")
    with pytest.raises(ValueError, match="Expected a preset in"):
        quantized_weight_bytes("llama-9", "q8_0")
    with pytest.raises(ValueError, match="model_type"):
        quantized_weight_bytes({"hidden_size": 64}, "q8_0")
