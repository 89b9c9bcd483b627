"""An existing project made to fit: a plain LightningModule trained with DDP, plus three callbacks.

The module below knows nothing of lightning_memopt: a Hugging Face Llama built from a config (random weights,
eager attention, as many older projects have it) trained on next-byte prediction with plain DDP. The only change
is the three callbacks passed to the Trainer (see docs/getting-started.md):

    callbacks=[
        MemoryMonitor(device_memory="2GiB"),   # predicted vs actual memory per rank, every step
        ActivationCheckpointing(),             # checkpoint every decoder block
        FlashAttention("sdpa"),                # eager attention -> SDPA (use "auto" on GPUs: flash-attn if installed)
    ]

    python examples/existing_project_ddp.py                    # CPU, 2 processes (DDP over gloo), 6 steps
    python examples/existing_project_ddp.py --without-memopt   # the project as it was
    python examples/existing_project_ddp.py --accelerator gpu --devices 8 --device-memory 80GiB --steps 100
"""

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_llm import ByteWindows


class ByteLM(pl.LightningModule):
    """A plain LightningModule: a small Llama (eager attention) with AdamW; no lightning_memopt inside."""

    def __init__(self, hidden_size: int = 64, num_layers: int = 2, lr: float = 3e-3) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.save_hyperparameters()
        config = LlamaConfig(
            vocab_size=256, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        )
        config._attn_implementation = "eager"
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class PrintLoss(pl.Callback):
    """Prints the rank-0 loss of the first and last step (what the CI test reads)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print(f"loss: first step {self.losses[0]:.3f}, last step {self.losses[-1]:.3f} ({len(self.losses)} steps)")


def memopt_callbacks(device_memory: str) -> list[pl.Callback]:
    """The three-line change: the callbacks that make the project fit, and measure it."""
    from lightning_memopt import ActivationCheckpointing, FlashAttention, MemoryMonitor

    monitor = MemoryMonitor(device_memory=device_memory, log_every_n_steps=1)
    return [monitor, ActivationCheckpointing(), FlashAttention("sdpa")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--device-memory", default="2GiB", help="one device's memory for the monitor's fit check")
    parser.add_argument("--without-memopt", action="store_true", help="train the project unchanged")
    parser.add_argument("--log-dir", type=Path, default=None, help="CSV logs (default: a temporary directory)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    pl.seed_everything(0)
    log_dir = args.log_dir or Path(tempfile.gettempdir()) / "existing_project_ddp"
    callbacks = [PrintLoss()] + ([] if args.without_memopt else memopt_callbacks(args.device_memory))
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy="ddp",
        precision="32-true" if args.accelerator == "cpu" else "bf16-mixed",
        max_steps=args.steps,
        logger=CSVLogger(log_dir),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    data = DataLoader(ByteWindows(seq_len=args.seq_len, stride=16), batch_size=args.batch_size)
    trainer.fit(ByteLM(), data)
    if torch.distributed.is_initialized():
        # Lightning destroys only NCCL groups at exit; a gloo group left to the interpreter's teardown can abort the
        # finished run (pytorch#190489). MemOptStrategy destroys the group it makes; plain DDP leaves it to you.
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
