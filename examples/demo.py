"""The README demo: where the memory goes while a small Llama-style model trains on CPU, 2 processes under ZeRO.

    python examples/demo.py                                   # ZeRO-2, 2 processes, a 32 MiB device each
    python examples/demo.py --zero 3 --device-memory 24MiB --steps 20

Each process pretends its device holds ``--device-memory`` (a stand-in for a GPU's 80 GiB). Before step one,
``BatchPlanner`` finds the largest micro-batch whose predicted peak fits that budget and the gradient accumulation
that reaches the global batch (the lecture's "find the largest micro-batch first"), and ``MemoryMonitor`` prints
the predicted per-rank breakdown and the fit verdict. While training, the progress bar shows the loss and each
step's actual and predicted peak (``mem_MiB`` / ``pred_MiB``, rank 0). At the end: actual vs predicted per rank,
and the plot's path. Lightning's and DeepSpeed's start-up chatter is hidden (``--verbose`` shows it).
"""

import argparse
import logging
import os
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed: no "unable to detect a GPU" warning on CPU

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from tiny_llm import CausalLM, TextDataModule

from lightning_memopt import MemOptStrategy
from lightning_memopt.lightning.callbacks.batch_planner import BatchPlanner
from lightning_memopt.lightning.callbacks.memory_monitor import MemoryMonitor

#: Lightning's and DeepSpeed's set-up messages the demo does not show (the package's own are kept).
_CHATTER = ("GPU available", "TPU available", "HPU available", "initializing deepspeed distributed",
            "Enabling DeepSpeed", "You are using a CUDA device", "LOCAL_RANK", "Seed set to", "`Trainer.fit` stopped",
            "💡 Tip")  # fmt: skip


class _HideChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().lstrip().startswith(_CHATTER)


class MemoryBar(TQDMProgressBar):
    """Lightning's progress bar without the logger's version number: the loss and the memory of each step."""

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class LossSummary(Callback):
    """Rank 0 prints the training loss of the first and the last step at the end (the progress bar shows the rest)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(trainer.callback_metrics["train_loss"])

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.losses:
            first, last = min(self.losses), max(self.losses)
            print(f"\ntrain loss (rank 0): {self.losses[first]:.3f} at the start -> {self.losses[last]:.3f}"
                  f" after {last} steps")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero", type=int, default=2, help="ZeRO stage 0-3")
    parser.add_argument("--devices", type=int, default=2, help="processes")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--device-memory", default="32MiB", help="the pretend device memory of each process")
    parser.add_argument("--global-batch-tokens", type=int, default=4096, help="tokens per optimizer step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--log-dir", default="lightning_logs", help="where the CSV log and the plot go")
    parser.add_argument("--verbose", action="store_true", help="show Lightning's and DeepSpeed's messages")
    args = parser.parse_args()
    if not args.verbose:
        warnings.filterwarnings("ignore")
        for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
            logging.getLogger(name).addFilter(_HideChatter())
        for handler in logging.getLogger("lightning.pytorch").handlers:
            handler.addFilter(_HideChatter())

    pl.seed_everything(0, verbose=False)
    model = CausalLM(hidden_size=128, num_layers=4, lr=3e-3)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        params = sum(p.numel() for p in model.parameters())
        print(f"lightning-memopt demo: a Llama-style model ({params / 1e6:.2f}M parameters, random weights) learns"
              f" data/lecture-notes.txt (bytes as tokens) on {args.devices} CPU processes under ZeRO-{args.zero},"
              f" {args.precision}; each process pretends its device holds {args.device_memory}.\n")  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=MemOptStrategy(zero=args.zero),
        precision=args.precision,
        max_steps=args.steps,
        logger=CSVLogger(args.log_dir, name="demo"),
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[  # the bar first: it closes its line at the end of training before the others print
            MemoryBar(),
            BatchPlanner(args.global_batch_tokens, device_memory=args.device_memory, seq_len=args.seq_len),
            MemoryMonitor(device_memory=args.device_memory, log_every_n_steps=1, progress_bar=True),
            LossSummary(),
        ],
    )
    trainer.fit(model, TextDataModule(batch_size=1, seq_len=args.seq_len, stride=16))


if __name__ == "__main__":
    main()
