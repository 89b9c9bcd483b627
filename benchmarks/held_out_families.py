"""``estimate_memory`` on Hugging Face families the accuracy matrix does not cover, against real CPU runs.

The matrix of ``benchmarks/predictor_accuracy.py`` has 11 kinds (Llama, Qwen2, plain PyTorch, T5, BERT, Mixtral,
ViT, a CNN, LoRA, a partly frozen Llama, GPT-NeoX). This script takes other families (decoders, encoder-decoders,
masked LMs, speech, vision; 80 since the second sweep: SSMs and hybrids, more MoE, CTC speech), each a tiny model
from its config with random weights (2 blocks or stages, hidden 64, vocabulary 256, :data:`FAMILIES`), and runs the
matrix's single-device configurations on them: Lightning's single-device strategy (engine ``"torch"``),
{32-true, bf16-mixed} x {eager, sdpa where the family has SDPA} x checkpointing off/on (the package's
``ActivationCheckpointing`` callback; ``activation_checkpointing=True`` predicted).

Fair by construction: a family plugs its module and data into ``predictor_accuracy``'s own ``predict`` and
``run_config`` (the same LightningModule, ``HFModule``, with its own loss; the same Trainer, the same counting
allocator as the judge, baseline right before the model is built, peak reset per step, steady state = steps 2..N;
the same claim, ``accuracy_targets.within_claim``). Every family runs in a fresh subprocess of its own (predicting
first, then measuring), so nothing an earlier family left behind is in a later measurement, and a crash stays with its
family.

Usage::

    python benchmarks/held_out_families.py       # every family, to benchmarks/results/held_out_families.json
    python benchmarks/held_out_families.py --families gpt2,bart --precisions 32-true
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

SEQ_LEN, MICRO_BATCH, VOCAB, HIDDEN, LAYERS = 64, 2, 256, 64, 2
IMAGE_SIZE, CLASSES, MEL_BINS = 32, 10, 16

_LM = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": LAYERS,
       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip
_SEQ2SEQ = {"vocab_size": VOCAB, "d_model": HIDDEN, "encoder_layers": LAYERS, "decoder_layers": LAYERS,
            "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 2 * HIDDEN,
            "decoder_ffn_dim": 2 * HIDDEN, "max_position_embeddings": 256}  # fmt: skip
_ENCODER = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
            "intermediate_size": 2 * HIDDEN, "max_position_embeddings": 256}  # fmt: skip

#: family -> (architecture, model_type, config fields, data: "causal" | "masked" | "seq2seq" | "speech" | "image")
FAMILIES: "dict[str, tuple[str, str, dict, str]]" = {
    "gpt2": (
        "GPT2LMHeadModel",
        "gpt2",
        {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 4, "n_positions": 256},
        "causal",
    ),
    "opt": (
        "OPTForCausalLM",
        "opt",
        {
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "ffn_dim": 2 * HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 4,
            "word_embed_proj_dim": HIDDEN,
            "max_position_embeddings": 256,
        },
        "causal",
    ),
    "bloom": (
        "BloomForCausalLM",
        "bloom",
        {"vocab_size": VOCAB, "hidden_size": HIDDEN, "n_layer": LAYERS, "n_head": 4},
        "causal",
    ),
    "falcon": (
        "FalconForCausalLM",
        "falcon",
        {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 4},
        "causal",
    ),
    "gptj": (
        "GPTJForCausalLM",
        "gptj",
        {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 4, "rotary_dim": 8, "n_positions": 256},
        "causal",
    ),
    "codegen": (
        "CodeGenForCausalLM",
        "codegen",
        {
            "vocab_size": VOCAB,
            "n_embd": HIDDEN,
            "n_layer": LAYERS,
            "n_head": 4,
            "rotary_dim": 8,
            "n_positions": 256,
            "n_ctx": 256,
        },
        "causal",
    ),
    "stablelm": ("StableLmForCausalLM", "stablelm", dict(_LM), "causal"),
    "phi": ("PhiForCausalLM", "phi", dict(_LM, partial_rotary_factor=0.5), "causal"),
    "gemma3_text": ("Gemma3ForCausalLM", "gemma3_text", dict(_LM, head_dim=16, sliding_window=16), "causal"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", dict(_LM, head_dim=16), "causal"),
    "olmo2": ("Olmo2ForCausalLM", "olmo2", dict(_LM), "causal"),
    "cohere": ("CohereForCausalLM", "cohere", dict(_LM), "causal"),
    "granite": ("GraniteForCausalLM", "granite", dict(_LM), "causal"),
    "starcoder2": ("Starcoder2ForCausalLM", "starcoder2", dict(_LM), "causal"),
    "mpt": (
        "MptForCausalLM",
        "mpt",
        {
            "vocab_size": VOCAB,
            "d_model": HIDDEN,
            "n_heads": 4,
            "n_layers": LAYERS,
            "expansion_ratio": 2,
            "max_seq_len": 256,
        },
        "causal",
    ),
    "bart": ("BartForConditionalGeneration", "bart", dict(_SEQ2SEQ), "seq2seq"),
    "mbart": ("MBartForConditionalGeneration", "mbart", dict(_SEQ2SEQ), "seq2seq"),
    "pegasus": ("PegasusForConditionalGeneration", "pegasus", dict(_SEQ2SEQ), "seq2seq"),
    # Whisper's encoder takes 2 x max_source_positions frames of num_mel_bins features
    "whisper": (
        "WhisperForConditionalGeneration",
        "whisper",
        dict(
            _SEQ2SEQ,
            num_mel_bins=MEL_BINS,
            max_source_positions=SEQ_LEN // 2,
            max_target_positions=256,
            decoder_start_token_id=1,
            pad_token_id=0,
        ),
        "speech",
    ),
    "roberta": ("RobertaForMaskedLM", "roberta", dict(_ENCODER, max_position_embeddings=258), "masked"),
    "electra": ("ElectraForMaskedLM", "electra", dict(_ENCODER, embedding_size=HIDDEN), "masked"),
    "deberta_v2": ("DebertaV2ForMaskedLM", "deberta-v2", dict(_ENCODER), "masked"),
    "distilbert": (
        "DistilBertForMaskedLM",
        "distilbert",
        {
            "vocab_size": VOCAB,
            "dim": HIDDEN,
            "n_layers": LAYERS,
            "n_heads": 4,
            "hidden_dim": 2 * HIDDEN,
            "max_position_embeddings": 256,
        },
        "masked",
    ),
    "swin": (
        "SwinForImageClassification",
        "swin",
        {
            "image_size": IMAGE_SIZE,
            "patch_size": 2,
            "embed_dim": 32,
            "depths": [2, 2],
            "num_heads": [2, 4],
            "window_size": 4,
            "num_labels": CLASSES,
        },
        "image",
    ),
    "convnext": (
        "ConvNextForImageClassification",
        "convnext",
        {
            "image_size": IMAGE_SIZE,
            "num_channels": 3,
            "hidden_sizes": [32, HIDDEN],
            "depths": [2, 2],
            "num_stages": 2,
            "num_labels": CLASSES,
        },
        "image",
    ),
}

# ---------------------------------------------------------------- the second sweep (2026-12-05): 55 more families
CTC_VOCAB = 32
_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_ENC_DEC = dict(_SEQ2SEQ, decoder_start_token_id=1, **_IDS)
_T5 = {"vocab_size": VOCAB, "d_model": HIDDEN, "d_ff": 2 * HIDDEN, "d_kv": 16, "num_layers": LAYERS,
       "num_decoder_layers": LAYERS, "num_heads": 4, "decoder_start_token_id": 0, "pad_token_id": 0}  # fmt: skip
_MOE = dict(_LM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=HIDDEN)
_VIT = {"image_size": IMAGE_SIZE, "patch_size": 4, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
        "num_attention_heads": 4, "intermediate_size": 2 * HIDDEN, "num_labels": CLASSES}  # fmt: skip
_CTC = {"vocab_size": CTC_VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "intermediate_size": 2 * HIDDEN, "conv_dim": [32, 32], "conv_stride": [5, 2], "conv_kernel": [10, 3],
        "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4, "pad_token_id": 0,
        "ctc_loss_reduction": "mean", "mask_time_prob": 0.0}  # fmt: skip
_GEMMA2 = dict(_LM, head_dim=16, sliding_window=16, **_IDS)
FAMILIES.update({
    # decoders without attention, recurrent or hybrid (SSM, convolutions)
    "mamba": ("MambaForCausalLM", "mamba", {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
              "state_size": 8, "expand": 2, "conv_kernel": 4}, "causal"),
    "mamba2": ("Mamba2ForCausalLM", "mamba2", {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
               "state_size": 16, "expand": 2, "conv_kernel": 4, "num_heads": 8, "head_dim": 16, "n_groups": 1,
               "chunk_size": 16}, "causal"),
    "rwkv": ("RwkvForCausalLM", "rwkv", {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
             "attention_hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "context_length": 256}, "causal"),
    "recurrent_gemma": ("RecurrentGemmaForCausalLM", "recurrent_gemma", dict(
        _LM, num_key_value_heads=1, lru_width=HIDDEN, attention_window_size=16,
        block_types=["recurrent", "attention"], conv1d_width=4), "causal"),
    "jamba": ("JambaForCausalLM", "jamba", dict(
        _LM, num_experts=2, num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
        attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
        use_mamba_kernels=False), "causal"),
    "falcon_h1": ("FalconH1ForCausalLM", "falcon_h1", dict(
        _LM, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
        mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16), "causal"),
    "bamba": ("BambaForCausalLM", "bamba", dict(
        _LM, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16,
        mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, **_IDS), "causal"),
    "zamba2": ("Zamba2ForCausalLM", "zamba2", {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
        "layers_block_type": ["mamba", "hybrid"], "mamba_d_state": 16, "mamba_expand": 2, "n_mamba_heads": 4,
        "chunk_size": 16, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 2 * HIDDEN,
        "adapter_rank": 8, "use_mamba_kernels": False, "max_position_embeddings": 256, **_IDS}, "causal"),
    "lfm2": ("Lfm2ForCausalLM", "lfm2", dict(_LM, layer_types=["conv", "full_attention"],
                                              block_auto_adjust_ff_dim=False, **_IDS), "causal"),
    # decoders: mixtures of experts, multi-head latent attention
    "olmoe": ("OlmoeForCausalLM", "olmoe", dict(_LM, num_experts=4, num_experts_per_tok=2), "causal"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "qwen2_moe", dict(_MOE, shared_expert_intermediate_size=HIDDEN), "causal"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe", dict(_MOE, head_dim=16), "causal"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "deepseek_v3", dict(
        _LM, num_key_value_heads=4, moe_intermediate_size=HIDDEN, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, rope_scaling=None), "causal"),
    "granitemoe": ("GraniteMoeForCausalLM", "granitemoe", dict(_LM, num_local_experts=4, num_experts_per_tok=2),
                   "causal"),
    "jetmoe": ("JetMoeForCausalLM", "jetmoe", {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_key_value_heads": 2,
        "kv_channels": 16, "intermediate_size": 2 * HIDDEN, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 256, **_IDS}, "causal"),
    "dbrx": ("DbrxForCausalLM", "dbrx", {
        "vocab_size": VOCAB, "d_model": HIDDEN, "n_heads": 4, "n_layers": LAYERS, "max_seq_len": 256,
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 2 * HIDDEN, "moe_num_experts": 4, "moe_top_k": 2}, "pad_token_id": 0},
        "causal"),
    "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM", "ernie4_5_moe", dict(
        _LM, head_dim=16, moe_num_experts=4, moe_k=2, moe_intermediate_size=HIDDEN, moe_layer_start_index=1,
        moe_num_shared_experts=1, **_IDS), "causal"),
    # decoders: attention variants (multi-query, sliding windows, learned positions)
    "gpt_bigcode": ("GPTBigCodeForCausalLM", "gpt_bigcode", {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": LAYERS,
                    "n_head": 4, "n_positions": 256, "multi_query": True}, "causal"),
    "biogpt": ("BioGptForCausalLM", "biogpt", dict(_ENCODER), "causal"),
    "xglm": ("XGLMForCausalLM", "xglm", {"vocab_size": VOCAB, "d_model": HIDDEN, "num_layers": LAYERS,
             "attention_heads": 4, "ffn_dim": 2 * HIDDEN, "max_position_embeddings": 256}, "causal"),
    "persimmon": ("PersimmonForCausalLM", "persimmon", dict(_LM, num_key_value_heads=4), "causal"),
    "nemotron": ("NemotronForCausalLM", "nemotron", dict(_LM, head_dim=16), "causal"),
    "glm4": ("Glm4ForCausalLM", "glm4", dict(_LM, head_dim=16, pad_token_id=0, eos_token_id=2), "causal"),
    "helium": ("HeliumForCausalLM", "helium", dict(_LM, head_dim=16), "causal"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2", dict(_LM, head_dim=16, sliding_window=16), "causal"),
    "phi3": ("Phi3ForCausalLM", "phi3", dict(_LM, **_IDS), "causal"),
    "mistral": ("MistralForCausalLM", "mistral", dict(_LM, head_dim=16, sliding_window=16), "causal"),
    "exaone4": ("Exaone4ForCausalLM", "exaone4", dict(_LM, head_dim=16, sliding_window=16, **_IDS), "causal"),
    "smollm3": ("SmolLM3ForCausalLM", "smollm3", dict(_LM, **_IDS), "causal"),
    "arcee": ("ArceeForCausalLM", "arcee", dict(_LM, **_IDS), "causal"),
    "seed_oss": ("SeedOssForCausalLM", "seed_oss", dict(_LM, head_dim=16, **_IDS), "causal"),
    "hunyuan_v1_dense": ("HunYuanDenseV1ForCausalLM", "hunyuan_v1_dense", dict(_LM, head_dim=16, **_IDS), "causal"),
    # encoder-decoders
    "mt5": ("MT5ForConditionalGeneration", "mt5", dict(_T5), "seq2seq"),
    "umt5": ("UMT5ForConditionalGeneration", "umt5", dict(_T5), "seq2seq"),
    "longt5": ("LongT5ForConditionalGeneration", "longt5", dict(_T5, local_radius=8, encoder_attention_type="local"),
               "seq2seq"),
    "t5gemma": ("T5GemmaForConditionalGeneration", "t5gemma", {"encoder": dict(_GEMMA2), "decoder": dict(_GEMMA2),
                "vocab_size": VOCAB, **_IDS, "decoder_start_token_id": 1}, "seq2seq"),
    "marian": ("MarianMTModel", "marian", dict(_ENC_DEC, decoder_vocab_size=VOCAB), "seq2seq"),
    "blenderbot": ("BlenderbotForConditionalGeneration", "blenderbot", dict(_ENC_DEC), "seq2seq"),
    "m2m_100": ("M2M100ForConditionalGeneration", "m2m_100", dict(_ENC_DEC), "seq2seq"),
    # Longformer's global-attention projections get no gradient without global tokens
    "led": ("LEDForConditionalGeneration", "led", dict(_ENC_DEC, attention_window=[16, 16],
            max_encoder_position_embeddings=256, max_decoder_position_embeddings=256), "seq2seq"),
    # masked LMs (ALBERT shares one layer's weights; MobileBERT ties its output embedding)
    "albert": ("AlbertForMaskedLM", "albert", dict(_ENCODER, embedding_size=32), "masked"),
    "modernbert": ("ModernBertForMaskedLM", "modernbert", dict(_ENCODER, global_attn_every_n_layers=2,
                   local_attention=16, pad_token_id=0), "masked"),
    "funnel": ("FunnelForMaskedLM", "funnel", {"vocab_size": VOCAB, "d_model": HIDDEN, "n_head": 4, "d_head": 16,
               "d_inner": 2 * HIDDEN, "block_sizes": [1, 1], "num_decoder_layers": 1}, "masked"),
    "mobilebert": ("MobileBertForMaskedLM", "mobilebert", dict(_ENCODER, embedding_size=32, true_hidden_size=32,
                   intra_bottleneck_size=32, num_feedforward_networks=2), "masked"),
    "xlm_roberta": ("XLMRobertaForMaskedLM", "xlm-roberta", dict(_ENCODER, max_position_embeddings=258), "masked"),
    # vision
    "dinov2": ("Dinov2ForImageClassification", "dinov2", dict(_VIT, mlp_ratio=2), "image"),
    "deit": ("DeiTForImageClassification", "deit", dict(_VIT), "image"),
    "beit": ("BeitForImageClassification", "beit", dict(_VIT, use_mean_pooling=True), "image"),
    "resnet": ("ResNetForImageClassification", "resnet", {"num_channels": 3, "embedding_size": 16,
               "hidden_sizes": [32, HIDDEN], "depths": [1, 1], "layer_type": "basic", "num_labels": CLASSES}, "image"),
    "swinv2": ("Swinv2ForImageClassification", "swinv2", {"image_size": IMAGE_SIZE, "patch_size": 2, "embed_dim": 32,
               "depths": [2, 2], "num_heads": [2, 4], "window_size": 4, "num_labels": CLASSES}, "image"),
    "levit": ("LevitForImageClassification", "levit", {
        "image_size": IMAGE_SIZE, "patch_size": 16, "hidden_sizes": [32, 64], "num_attention_heads": [2, 4],
        "depths": [1, 1], "key_dim": [8, 8], "mlp_ratio": [2, 2], "attention_ratio": [2, 2],
        "down_ops": [["Subsample", 8, 4, 4, 2, 2]], "num_labels": CLASSES}, "image"),
    "mobilevit": ("MobileViTForImageClassification", "mobilevit", {
        "image_size": IMAGE_SIZE, "patch_size": 2, "hidden_sizes": [32, 48, 64],
        "neck_hidden_sizes": [8, 16, 24, 32, 40, 48, 96], "num_attention_heads": 4, "mlp_ratio": 2.0,
        "num_labels": CLASSES}, "image"),
    "segformer": ("SegformerForImageClassification", "segformer", {
        "image_size": IMAGE_SIZE, "num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1],
        "hidden_sizes": [32, 64], "patch_sizes": [7, 3], "strides": [4, 2], "num_attention_heads": [1, 2],
        "mlp_ratios": [2, 2], "decoder_hidden_size": 64, "num_labels": CLASSES}, "image"),
    # speech: raw audio and CTC labels
    "wav2vec2": ("Wav2Vec2ForCTC", "wav2vec2", dict(_CTC), "ctc"),
    "hubert": ("HubertForCTC", "hubert", dict(_CTC), "ctc"),
})  # fmt: skip
#: families whose kernels include convolutions (oneDNN's workspace: ``accuracy_targets.scratch_allowance``): conv
#: layers, patch embeddings and the SSMs' causal conv1d
CONVOLUTIONS = ("whisper", "swin", "convnext", "mamba", "mamba2", "jamba", "falcon_h1", "recurrent_gemma", "bamba",
                "zamba2", "lfm2", "dinov2", "deit", "beit", "resnet", "swinv2", "levit", "mobilevit", "segformer",
                "wav2vec2", "hubert")  # fmt: skip
PRECISIONS = ("32-true", "bf16-mixed")


def family_config(family: str) -> "dict[str, Any]":
    """The ``config.json`` dict of a family (``HFModule`` builds ``architectures[0]`` from it)."""
    architecture, model_type, fields, _ = FAMILIES[family]
    return {"model_type": model_type, **fields, "architectures": [architecture]}


def build_family_module(family: str, attention: "str | None") -> Any:
    """The family's LightningModule: the matrix's ``HFModule`` (the Hugging Face model, its own loss, AdamW)."""
    from accuracy_kinds import HFModule

    torch.manual_seed(0)
    return HFModule(family_config(family), attention)


class FamilyData(torch.utils.data.Dataset):
    """A family's samples: byte windows of the shipped text (``seq_len`` bytes) as the matrix's kinds take them
    (causal: labels = inputs; masked: every 7th token masked and predicted; seq2seq: the next window is the
    target), seeded random log-mel features (speech) or images (vision)."""

    def __init__(self, family: str, seq_len: int, size: int = 32) -> None:
        from tiny_llm import ByteWindows

        self.data = FAMILIES[family][3]
        self.text = ByteWindows(seq_len=seq_len)
        self.seq_len, self.size = seq_len, min(size, len(self.text) - 1)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> "dict[str, torch.Tensor]":
        gen = torch.Generator().manual_seed(index)
        if self.data == "image":
            return {"pixel_values": torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=gen),
                    "labels": torch.tensor(index % CLASSES)}  # fmt: skip
        ids = self.text[index]
        if self.data == "masked":
            masked = torch.arange(len(ids)) % 7 == 3
            return {"input_ids": ids.masked_fill(masked, 0), "labels": ids.masked_fill(~masked, -100)}
        if self.data == "seq2seq":
            return {"input_ids": ids, "labels": self.text[index + 1]}
        if self.data == "ctc":  # raw audio (10 x seq_len samples) and CTC labels (token ids 1..CTC_VOCAB-1)
            return {"input_values": torch.randn(10 * self.seq_len, generator=gen),
                    "labels": ids[: self.seq_len // 4] % (CTC_VOCAB - 1) + 1}  # fmt: skip
        if self.data == "speech":  # Whisper's encoder takes 2 x max_source_positions frames
            return {"input_features": torch.randn(MEL_BINS, self.seq_len, generator=gen), "labels": ids}
        return {"input_ids": ids, "labels": ids.clone()}


def family_loader(cfg: "dict[str, Any]") -> Any:
    """The training loader of a configuration (no shuffling: every run sees the same batches)."""
    return torch.utils.data.DataLoader(FamilyData(cfg["kind"], cfg["seq_len"]), batch_size=cfg["micro_batch"])


def family_batch(family: str, seq_len: int = SEQ_LEN, micro_batch: int = MICRO_BATCH) -> Any:
    """The first micro-batch a family's run trains on."""
    return next(iter(family_loader({"kind": family, "seq_len": seq_len, "micro_batch": micro_batch})))


def attentions_of(family: str) -> "tuple[list, dict]":
    """The attention implementations the family builds with and, per one it refuses, transformers' reason (a model
    without attention, ConvNeXt, still builds with ``"eager"``, the implementation its config then holds)."""
    ok, refused = [], {}
    for attention in ("eager", "sdpa"):
        try:
            build_family_module(family, attention)
            ok.append(attention)
        except (ValueError, ImportError) as err:
            refused[attention] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return ok, refused


# ---------------------------------------------------------------- one family, in a process of its own
def family_worker(family: str, args: argparse.Namespace, out: Path) -> None:
    """Predict every configuration of the family (before anything is measured), then run them: through
    ``predictor_accuracy``'s own ``predict`` and ``run_config``, with the family's module and data."""
    import predictor_accuracy as pa

    pa.build_module = lambda cfg: build_family_module(cfg["kind"], cfg["attention"])
    pa.first_batch = lambda cfg: family_batch(cfg["kind"], cfg["seq_len"], cfg["micro_batch"])
    pa.dataloader = family_loader
    attentions, refused = attentions_of(family)
    wanted = [a for a in attentions if a in args.attention.split(",")]
    configs = []
    for precision in args.precisions.split(","):
        for attention in wanted:
            for ckpt in args.checkpointing.split(","):
                configs.append({"index": len(configs), "kind": family, "stage": "single", "world_size": 1,
                                "precision": precision, "attention": attention, "checkpointing": ckpt == "on",
                                "accumulate": 1, "offload": "none", "runs_on_cpu": True, "hidden": HIDDEN,
                                "layers": LAYERS, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
                                "steps": args.steps})  # fmt: skip
    predictions = {}
    for cfg in configs:
        try:
            predictions[cfg["index"]] = pa.predict(cfg)
        except Exception as err:  # building the module or reading its settings failed: the run says why
            where = traceback.extract_tb(err.__traceback__)[-1]
            predictions[cfg["index"]] = {"module": {"failed": "crash", "error": f"{type(err).__name__}: "
                                                    f"{str(err).splitlines()[0][:300]} ({Path(where.filename).name}:"
                                                    f"{where.lineno})"}, "settings": {}}  # fmt: skip
    probes = pa.start_probes()
    results = [pa.run_config(probes, cfg) for cfg in configs]
    for probe in probes.values():
        probe.close()
    for r in results:
        r["settings_diff"] = pa.settings_diff(predictions[r["index"]]["settings"], r["run_settings"])
        r["settings_match"] = not r["settings_diff"]
    rows = pa.rows_of(results, predictions, ("module",))
    for row in rows:
        row["convolutions"] = family in CONVOLUTIONS
        if row.get("module") is not None:
            from accuracy_targets import within_claim

            row["module_within_claim"] = within_claim(row["module"], row["measured"], row["precision"],
                                                      row["convolutions"])  # fmt: skip
    out.write_text(json.dumps({"rows": rows, "refused_attention": refused}, default=str))


def run_family(family: str, argv: "list[str]") -> dict:
    """A family's rows from a fresh subprocess (this script with ``--worker``)."""
    with tempfile.TemporaryDirectory(prefix="held_out_") as work:
        out = Path(work, "rows.json")
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", family, "--worker-out", str(out)]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"family": family, "failed": f"exit {proc.returncode}: {' | '.join(tail)[-400:]}", "rows": [],
                    "seconds": seconds, "command": shlex.join(command)}  # fmt: skip
        return {"family": family, "failed": None, **json.loads(out.read_text()), "seconds": seconds}


def _pct(value: "float | None") -> str:
    return "-" if value is None else f"{value:+.2f}"


def print_table(families: "list[dict]") -> None:
    print(f"\n{'family':<12} {'precision':<10} {'attention':<9} {'ckpt':<5} {'predicted':>11} {'measured':>11}"
          f" {'error %':>8} {'tensors %':>9}  note")  # fmt: skip
    for fam in families:
        if fam["failed"]:
            print(f"{fam['family']:<12} FAILED: {fam['failed']}")
            continue
        for r in fam["rows"]:
            note = r.get("run_failed") or r.get("module_error") or ""
            if r.get("module_within_claim") is False:
                note = "OUTSIDE CLAIM " + note
            if r.get("settings_diff"):
                note += f" settings differ: {r['settings_diff']}"
            ckpt = "on" if r["checkpointing"] else "off"
            print(f"{r['kind']:<12} {r['precision']:<10} {r['attention']!s:<9} {ckpt:<5}"
                  f" {r.get('module') or '-':>11} {r.get('measured') or '-':>11} {_pct(r.get('module_error_pct')):>8}"
                  f" {_pct(r.get('module_tensors_error_pct')):>9}  {note}")  # fmt: skip
        for attention, reason in fam.get("refused_attention", {}).items():
            print(f"{fam['family']:<12} ({attention} not built: {reason})")


def summarize(families: "list[dict]") -> dict:
    rows = [r for fam in families for r in fam["rows"]]
    compared = [r for r in rows if r.get("module") is not None]
    errors = sorted(abs(r["module_error_pct"]) for r in compared)
    worst = {}
    for fam in families:
        errs = [abs(r["module_error_pct"]) for r in fam["rows"] if r.get("module") is not None]
        worst[fam["family"]] = max(errs) if errs else None
    return {
        "families": len(families), "configurations": len(rows), "compared": len(compared),
        "median_abs_error_pct": errors[len(errors) // 2] if errors else None,
        "worst_abs_error_pct": errors[-1] if errors else None,
        "over_1pct": sum(e > 1.0 for e in errors),
        "outside_claim": sum(r.get("module_within_claim") is False for r in compared),
        "refusals": sum(r.get("module_failed") == "refusal" for r in rows),
        "crashes": sum(r.get("module_failed") == "crash" for r in rows),
        "runs_failed": sum(bool(r.get("run_failed")) for r in rows),
        "families_failed": [fam["family"] for fam in families if fam["failed"]],
        "worst_by_family": worst,
    }  # fmt: skip


def parse_args(argv: "list[str]") -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"among {','.join(FAMILIES)}")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--attention", default="eager,sdpa", help="where the family builds with it")
    parser.add_argument("--checkpointing", default="off,on")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (steady: 2..N)")
    parser.add_argument("--micro-batch", type=int, default=MICRO_BATCH)
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" /
                        "held_out_families.json")  # fmt: skip
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [f for f in args.families.split(",") if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"Expected --families among {','.join(FAMILIES)}, got {unknown}. Fix: e.g. --families gpt2")
    return args


def main(argv: "list[str] | None" = None) -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        family_worker(args.worker, args, args.worker_out)
        return
    start = time.perf_counter()
    families = []
    for family in args.families.split(","):
        fam = run_family(family, argv)
        families.append(fam)
        errs = [abs(r["module_error_pct"]) for r in fam["rows"] if r.get("module") is not None]
        print(f"{family}: {len(fam['rows'])} configurations, worst |error| "
              f"{max(errs) if errs else float('nan'):.2f} %, {fam['seconds']:.0f} s"
              f"{'  FAILED: ' + fam['failed'] if fam['failed'] else ''}", flush=True)  # fmt: skip
    seconds = time.perf_counter() - start
    print_table(families)
    summ = summarize(families)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *argv])
    print(f"\n{summ['configurations']} configurations of {summ['families']} families, {summ['compared']} compared:"
          f" median |error| {summ['median_abs_error_pct']:.2f} %, worst {summ['worst_abs_error_pct']:.2f} %,"
          f" {summ['over_1pct']} over 1 %, {summ['outside_claim']} outside the claim, {summ['refusals']} refusals,"
          f" {summ['crashes']} crashes, {summ['runs_failed']} runs failed; {seconds:.0f} s.")  # fmt: skip
    print(f"Command: {command}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"families": families, "summary": summ, "seconds": seconds, "command": command,
                                    "torch": torch.__version__, "transformers": __import__("transformers").__version__},
                                   indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
