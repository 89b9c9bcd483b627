"""Small models of many kinds for the predictor's tests (random weights; Hugging Face ones from tiny configs)."""

import torch
from torch import nn
from transforms._models import plain_model


def tiny_config(model_type: str, layers: int = 2, **overrides) -> dict:
    """A tiny ``config.json`` dict of a Hugging Face family (every family's own fields)."""
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)  # fmt: skip
    configs = {
        "llama": base,
        "qwen2": base,
        "gemma3_text": dict(base, head_dim=16, sliding_window=16),
        "gpt_neox": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                         vocab_size=300, rotary_pct=0.25, max_position_embeddings=256),
        "mixtral": dict(base, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": dict(base, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=16),
        "deepseek_v3": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
                            num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=2, kv_lora_rank=16,
                            q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, vocab_size=300,
                            max_position_embeddings=256),
        "t5": dict(vocab_size=300, d_model=64, d_kv=16, d_ff=128, num_layers=layers, num_decoder_layers=layers,
                   num_heads=4, decoder_start_token_id=0, pad_token_id=0),
        "bart": dict(vocab_size=300, d_model=64, encoder_layers=layers, decoder_layers=layers,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                     max_position_embeddings=256),
        "bert": dict(vocab_size=300, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=256, architectures=["BertForMaskedLM"]),
        "vit": dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                    intermediate_size=128, num_labels=10, architectures=["ViTForImageClassification"]),
    }
    return {"model_type": model_type, **configs[model_type], **overrides}


#: the architecture a user trains each family with (a config's own ``architectures`` wins)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "gpt_neox": "GPTNeoXForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM", "t5": "T5ForConditionalGeneration",
                 "bart": "BartForConditionalGeneration", "bert": "BertForMaskedLM",
                 "vit": "ViTForImageClassification"}  # fmt: skip


def hf_from_config(model_type: str, layers: int = 2, seed: int = 0, **overrides) -> nn.Module:
    """The real (CPU, random weights) model of :func:`tiny_config`, built as a user builds it:
    ``AutoConfig.for_model`` and the architecture class (never through this package, whose reading it checks)."""
    import transformers
    from transformers import AutoConfig

    config = tiny_config(model_type, layers, **overrides)
    architecture = (config.get("architectures") or [ARCHITECTURES[model_type]])[0]
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    torch.manual_seed(seed)
    return getattr(transformers, architecture)(AutoConfig.for_model(model_type, **fields)).train()


class CNN(nn.Module):
    """A convolutional classifier with BatchNorm (running statistics are buffers) and its own loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )  # fmt: skip

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(images), labels)


class LMStep(nn.Module):
    """A plain language model stepped as a LightningModule: next-token cross-entropy in ``training_step``."""

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.model = plain_model(**kwargs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)

    def training_step(self, ids: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self.model(ids)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def lora(model: nn.Module, rank: int = 4, targets: "tuple[str, ...]" = ("q_proj", "v_proj")) -> nn.Module:
    """``model`` with PEFT LoRA adapters (base frozen)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, target_modules=list(targets)))
