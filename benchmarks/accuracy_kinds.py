"""The model kinds of ``benchmarks/predictor_accuracy.py``: small LightningModules from tiny configs, and their data.

Random weights (seed 0), nothing downloaded. Every kind trains with AdamW on what :func:`dataset` yields:

* ``llama``, ``qwen2`` (GQA 4/2, tied embeddings): ``CausalLM`` of ``examples/tiny_llm.py`` (it calls ``self.log``
  in ``training_step``), on byte windows of the shipped text (a tensor batch);
* ``plain``: ``PlainLM`` of ``examples/plain_transformer.py`` (``nn.MultiheadAttention``, ``nn.RMSNorm``, GELU
  MLP, its own shifted loss);
* ``t5`` (encoder-decoder), ``bert`` (encoder-only, masked LM), ``mixtral`` (top-2 of 4 experts, transformers'
  grouped experts), ``vit`` (image classifier), ``neox`` (GPT-NeoX, parallel residual): :class:`HFModule`, the Hugging
  Face model and its own loss, on dict batches (token windows with labels; random images with class labels);
* ``lora``: the Llama of :class:`HFModule` with PEFT LoRA adapters (rank 8 on ``q_proj``/``v_proj``, base frozen);
* ``frozen``: that Llama with its embeddings and the first half of its blocks frozen;
* ``cnn``: :class:`CNN`, convolution blocks with BatchNorm in an ``nn.ModuleList`` (so checkpointing applies to
  them) and no attention.
"""

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

KINDS = ("llama", "qwen2", "plain", "t5", "bert", "mixtral", "vit", "cnn", "lora", "frozen", "neox")
#: kinds without attention (no attention axis)
NO_ATTENTION = ("cnn",)
#: kinds whose LightningModule is the Hugging Face model and its own loss: also predicted from the config alone
#: (``lora`` through ``estimate_memory``'s what-if ``lora_rank``/``lora_targets``)
CONFIG_ONLY = ("llama", "qwen2", "t5", "bert", "mixtral", "vit", "lora", "neox")
LORA_RANK, LORA_TARGETS = 8, ("q_proj", "v_proj")
#: (kind, strategy, precision) that do not train here, with the reason: left out of the matrix
UNTRAINABLE = {
    ("cnn", "zero", "bf16-mixed"): "DeepSpeed 0.19.8 casts parameters but not buffers to bf16 (engine.py"
    " _cast_module_mixed_precision) and CPU batch_norm rejects a bf16 input with fp32 running statistics",
}
IMAGE_SIZE, CLASSES = 32, 10


def hf_config(kind: str, hidden: int, layers: int) -> "dict[str, Any]":
    """The tiny ``config.json`` of a Hugging Face kind (the model class it trains is in ``architectures``)."""
    lm = {"vocab_size": 256, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
    configs = {
        "llama": ("LlamaForCausalLM", {"model_type": "llama", **lm}),
        "qwen2": ("Qwen2ForCausalLM", {"model_type": "qwen2", **lm, "tie_word_embeddings": True}),
        "t5": ("T5ForConditionalGeneration", {
            "model_type": "t5", "vocab_size": 256, "d_model": hidden, "d_kv": hidden // 4, "d_ff": 2 * hidden,
            "num_layers": layers, "num_decoder_layers": layers, "num_heads": 4, "decoder_start_token_id": 0,
            "pad_token_id": 0}),
        "bert": ("BertForMaskedLM", {
            "model_type": "bert", "vocab_size": 256, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": 4, "intermediate_size": 2 * hidden, "max_position_embeddings": 512}),
        "mixtral": ("MixtralForCausalLM", {"model_type": "mixtral", **lm, "num_local_experts": 4,
                                           "num_experts_per_tok": 2}),
        "vit": ("ViTForImageClassification", {
            "model_type": "vit", "image_size": IMAGE_SIZE, "patch_size": 4, "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": 4, "intermediate_size": 2 * hidden,
            "num_labels": CLASSES}),
        "neox": ("GPTNeoXForCausalLM", {
            "model_type": "gpt_neox", "vocab_size": 256, "hidden_size": hidden, "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": 4, "rotary_pct": 0.25, "use_parallel_residual": True,
            "max_position_embeddings": 512}),
    }
    base = "llama" if kind in ("lora", "frozen") else kind
    architecture, config = configs[base]
    return {**config, "architectures": [architecture]}


class HFModule(pl.LightningModule):
    """A Hugging Face model built from a config dict (random weights); ``training_step`` returns its own loss.

    Args:
        config: the ``config.json`` dict (:func:`hf_config`).
        attention: the attention implementation it is built with.
        lora: add PEFT LoRA adapters (:data:`LORA_RANK` on :data:`LORA_TARGETS`), base frozen.
        freeze_half: freeze the input embeddings and the first half of the blocks.
    """

    def __init__(self, config: "dict[str, Any]", attention: str, lora: bool = False, freeze_half: bool = False) -> None:
        super().__init__()
        import transformers
        from transformers import AutoConfig

        fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
        hf_config = AutoConfig.for_model(config["model_type"], **fields)
        self.model = getattr(transformers, config["architectures"][0])._from_config(
            hf_config, attn_implementation=attention
        )
        if lora:
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(self.model, LoraConfig(r=LORA_RANK, target_modules=list(LORA_TARGETS)))
        if freeze_half:
            base = self.model.model
            base.embed_tokens.requires_grad_(False)
            for block in base.layers[: len(base.layers) // 2]:
                block.requires_grad_(False)

    def training_step(self, batch: "dict[str, torch.Tensor]", batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


class ConvBlock(nn.Module):
    """3x3 convolution, BatchNorm (running statistics are buffers), ReLU, with a residual connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.norm(self.conv(x)))


class CNN(pl.LightningModule):
    """An image classifier: a convolution stem, :class:`ConvBlock` s in an ``nn.ModuleList``, pooling and a linear
    head, trained with cross-entropy."""

    def __init__(self, channels: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.ModuleList([ConvBlock(channels) for _ in range(layers)])
        self.head = nn.Linear(channels, CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))

    def training_step(self, batch: "tuple[torch.Tensor, torch.Tensor]", batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(self(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def build_module(cfg: "dict[str, Any]") -> pl.LightningModule:
    """The configuration's LightningModule, random weights from seed 0."""
    torch.manual_seed(0)
    kind, attention = cfg["kind"], cfg["attention"]
    if kind in ("llama", "qwen2"):
        from tiny_llm import CausalLM

        return CausalLM(family=kind, hidden_size=cfg["hidden"], num_layers=cfg["layers"], attn_implementation=attention)
    if kind == "plain":
        from plain_transformer import PlainLM

        return PlainLM(hidden=cfg["hidden"], layers=cfg["layers"], attention=attention)
    if kind == "cnn":
        return CNN(channels=cfg["hidden"] // 2, layers=cfg["layers"])
    config = hf_config(kind, cfg["hidden"], cfg["layers"])
    return HFModule(config, attention, lora=kind == "lora", freeze_half=kind == "frozen")


class KindData(Dataset):
    """The samples of a kind: byte windows of the shipped text (``seq_len`` bytes) for language models, seeded
    random images for the vision kinds."""

    def __init__(self, kind: str, seq_len: int, size: int = 32) -> None:
        from tiny_llm import ByteWindows

        self.kind = kind
        self.text = ByteWindows(seq_len=seq_len)
        self.size = min(size, len(self.text) - 1)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Any:
        if self.kind in ("vit", "cnn"):
            gen = torch.Generator().manual_seed(index)
            image = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
            label = torch.tensor(index % CLASSES)
            return {"pixel_values": image, "labels": label} if self.kind == "vit" else (image, label)
        ids = self.text[index]
        if self.kind in ("llama", "qwen2", "plain"):
            return ids
        if self.kind == "bert":  # every 7th token masked (id 0) and predicted; the others ignored
            masked = torch.arange(len(ids)) % 7 == 3
            return {"input_ids": ids.masked_fill(masked, 0), "labels": ids.masked_fill(~masked, -100)}
        if self.kind == "t5":  # the next window is the target
            return {"input_ids": ids, "labels": self.text[index + 1]}
        return {"input_ids": ids, "labels": ids.clone()}


def dataloader(cfg: "dict[str, Any]") -> DataLoader:
    """The training loader of a configuration (no shuffling: every run sees the same batches)."""
    return DataLoader(KindData(cfg["kind"], cfg["seq_len"]), batch_size=cfg["micro_batch"])


def first_batch(cfg: "dict[str, Any]") -> Any:
    """The first micro-batch the run trains on."""
    return next(iter(dataloader(cfg)))
