"""A small Llama-style causal LM and a byte-level text datamodule: the model of the demo, examples and tests.

The model is built from a Hugging Face config with random weights (nothing is downloaded); the text is
`data/lecture-notes.txt`, shipped in the repo. Bytes are tokens (vocabulary 256).
"""

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

TEXT = Path(__file__).resolve().parents[1] / "data" / "lecture-notes.txt"


def tiny_config(family: str = "llama", hidden_size: int = 64, num_layers: int = 2, attn_implementation: str = "sdpa"):
    """A tiny Hugging Face config of ``family`` (``llama``, ``qwen2`` or ``mistral``) with a 256-byte vocabulary."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if family == "qwen2":
        kwargs["tie_word_embeddings"] = True
    config = AutoConfig.for_model(family, **kwargs)
    config._attn_implementation = attn_implementation
    return config


class ByteWindows(Dataset):
    """Consecutive windows of ``seq_len`` bytes of a text, ``stride`` bytes apart."""

    def __init__(self, path: Path = TEXT, seq_len: int = 64, stride: int | None = None) -> None:
        self.data = torch.tensor(list(path.read_bytes()), dtype=torch.long)
        self.seq_len = seq_len
        self.stride = stride or seq_len
        if len(self.data) < seq_len:
            raise ValueError(f"Expected a text of at least seq_len={seq_len} bytes, got {len(self.data)} in {path}.")

    def __len__(self) -> int:
        return (len(self.data) - self.seq_len) // self.stride + 1

    def __getitem__(self, index: int) -> torch.Tensor:
        start = index * self.stride
        return self.data[start : start + self.seq_len]


class TextDataModule(pl.LightningDataModule):
    """Byte windows of the shipped text; no shuffling, so runs are reproducible."""

    def __init__(self, batch_size: int = 4, seq_len: int = 64, stride: int | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.stride = stride
        self.dataset = ByteWindows(seq_len=seq_len, stride=stride)  # one copy of the text for every loader

    def _loader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


class CausalLM(pl.LightningModule):
    """A Hugging Face causal LM built from a config (random weights), trained on next-byte prediction.

    Args:
        family: ``llama``, ``qwen2`` or ``mistral``.
        hidden_size: model width.
        num_layers: transformer blocks.
        lr: AdamW learning rate.
        attn_implementation: ``sdpa`` or ``eager``.
    """

    def __init__(
        self,
        family: str = "llama",
        hidden_size: int = 64,
        num_layers: int = 2,
        lr: float = 3e-3,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.save_hyperparameters()
        self.config = tiny_config(family, hidden_size, num_layers, attn_implementation)
        self.model = AutoModelForCausalLM.from_config(self.config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), sync_dist=True)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch), sync_dist=True)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
