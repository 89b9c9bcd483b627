"""A 2-process CPU fit of a tiny Phi-3 whose ``training_step`` does what common steps do (``self.log``, a loss
reduced over ranks and read with ``.item()``), under MemOptStrategy and MemoryMonitor; launched by
``test_monitor_training_steps.py``. Each rank writes ``OUT/rank{r}.json``: the monitor's history, its estimate's
details and the warnings and messages of the fit."""

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "examples"))
from tiny_llm import TextDataModule

from lightning_memopt import MemOptStrategy
from lightning_memopt.lightning.callbacks.memory_monitor import MemoryMonitor


class Phi3Module(pl.LightningModule):
    """A tiny Phi-3 (random weights, byte vocabulary) trained with the step many projects write."""

    def __init__(self, hidden_size: int = 128, num_layers: int = 2) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(
            "phi3", vocab_size=256, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=0,
        )  # fmt: skip
        config._attn_implementation = "sdpa"
        self.model = AutoModelForCausalLM.from_config(config)
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss)
        self.losses.append(self.trainer.strategy.reduce(loss.detach().float()).item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logging.getLogger("lightning.pytorch").addHandler(Keep())
    pl.seed_everything(0)
    monitor = MemoryMonitor(log_every_n_steps=1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=MemOptStrategy(zero=args.zero), precision="bf16-mixed",
        max_steps=args.steps, logger=CSVLogger(args.out / "logs", name="run"), callbacks=[monitor],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        limit_val_batches=0,
    )  # fmt: skip
    module = Phi3Module()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, TextDataModule(batch_size=4, seq_len=64))
    est = monitor.estimate
    result = {
        "rank": trainer.global_rank,
        "history": monitor.history,
        "details": None if est is None else json.loads(json.dumps(est.details, default=str)),
        "warnings": [str(w.message) for w in caught if "MemoryMonitor" in str(w.message)],
        "messages": [m for m in messages if "MemoryMonitor" in m],
        "losses": len(module.losses),
    }
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from helpers import end_distributed_run

    end_distributed_run()
