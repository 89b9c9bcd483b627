"""A decoder-only language model in plain PyTorch (no Hugging Face): ``nn.MultiheadAttention``, ``nn.RMSNorm``, GELU
MLP.

The "plain PyTorch" family of ``benchmarks/predictor_accuracy.py`` and of the tests: what the predictor reads from
a module's structure alone. ``attention="eager"`` asks ``nn.MultiheadAttention`` for its attention weights, which
materialises the s x s scores; ``"sdpa"`` does not, which makes PyTorch call ``scaled_dot_product_attention``.
"""

import lightning.pytorch as pl
import torch
from torch import nn


class PlainBlock(nn.Module):
    """Pre-norm transformer block around ``nn.MultiheadAttention`` with a causal mask."""

    def __init__(self, d: int, heads: int, attention: str = "eager") -> None:
        super().__init__()
        self.attention = attention
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        s = x.shape[1]
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        # need_weights=True materialises the s x s weights (eager); False lets PyTorch call SDPA
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=self.attention == "eager")[0]
        return x + self.mlp(self.norm2(x))


class PlainLM(pl.LightningModule):
    """:class:`PlainBlock` s between a byte embedding and an output projection, trained on next-byte prediction with
    AdamW."""

    def __init__(self, hidden: int = 128, layers: int = 2, heads: int = 4, attention: str = "sdpa",
                 vocab: int = 256) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList([PlainBlock(hidden, heads, attention) for _ in range(layers)])
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        return nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)
