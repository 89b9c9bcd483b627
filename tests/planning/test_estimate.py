"""What-if estimates: Liger kernels and LoRA adapters applied to a model built from a config, as the run would."""

import pytest
import torch
from predictor._modules import hf_from_config, lora, tiny_config

from lightning_memopt.planning import estimate_memory
from lightning_memopt.predictor.read.reading import read_model

CONFIG = tiny_config("llama", layers=2, vocab_size=4096)
RUN = dict(micro_batch_size=2, seq_len=128, precision="bf16-mixed")


def test_lora_trains_the_adapters_only():
    full = estimate_memory(CONFIG, **RUN)
    adapted = estimate_memory(CONFIG, lora_rank=4, lora_targets=["q_proj", "v_proj"], **RUN)
    reading = read_model(lora(hf_from_config("llama", vocab_size=4096), rank=4, targets=("q_proj", "v_proj")))
    assert adapted.details["trainable_parameters"] == reading.trainable_parameters
    assert adapted.details["num_parameters"] == reading.num_parameters
    assert adapted.optimizer_states < full.optimizer_states / 100
    assert adapted.details["lora_rank"] == 4


def test_the_same_lora_model_passed_as_a_module_is_predicted_alike():
    """The what-if builds exactly what a user builds with PEFT: predicting their module gives the same bytes."""
    batch = {"input_ids": torch.randint(0, 4096, (2, 128)), "labels": torch.randint(0, 4096, (2, 128))}
    module = lora(hf_from_config("llama", vocab_size=4096), rank=4, targets=("q_proj", "v_proj"))
    as_module = estimate_memory(module, example_batch=batch, precision="bf16-mixed")
    what_if = estimate_memory(CONFIG, lora_rank=4, lora_targets=["q_proj", "v_proj"], **RUN)
    assert as_module.total == what_if.total


def test_liger_fused_cross_entropy_never_holds_the_logits():
    plain = estimate_memory(CONFIG, **RUN)
    fused = estimate_memory(CONFIG, liger={"fused_linear_cross_entropy": True}, **RUN)
    assert fused.logits < plain.logits / 4 and fused.details["liger"]["fused_linear_cross_entropy"]


def test_what_ifs_refuse_what_they_cannot_apply():
    module = hf_from_config("llama")
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "labels": torch.zeros(1, 8, dtype=torch.long)}
    with pytest.raises(ValueError, match="get_peft_model"):
        estimate_memory(module, example_batch=batch, lora_rank=8)
    with pytest.raises(ValueError, match="apply_liger"):
        estimate_memory(module, example_batch=batch, liger=True)
    with pytest.raises(ValueError, match="parameter count"):
        estimate_memory("8B", lora_rank=8)
    with pytest.raises(ValueError, match="lora_targets.*alone"):
        estimate_memory(CONFIG, lora_targets=["q_proj"], **RUN)
    with pytest.raises(ValueError, match="positive int"):
        estimate_memory(CONFIG, lora_rank=0, **RUN)
    with pytest.raises(ValueError, match="Liger switches"):
        estimate_memory(CONFIG, liger={"flash": True}, **RUN)
