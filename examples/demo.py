"""The README demo: a small Llama-style model trained on the shipped text, on CPU with 2 processes under ZeRO.

    python examples/demo.py                 # ZeRO-2, 2 processes, 40 steps
    python examples/demo.py --zero 3 --steps 60

Prints the training loss every few steps (it falls from about 5.5, the entropy of random bytes, towards 2-3).
"""

import argparse
import warnings

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from tiny_llm import CausalLM, TextDataModule

from lightning_memopt import MemOptStrategy


class LossTable(Callback):
    """Collects the training loss of every step (rank 0) and prints it as a table at the end."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print("\nstep | train loss (rank 0)")
            for step, loss in self.losses.items():
                if step == 1 or step % self.every == 0:
                    print(f"{step:4d} | {loss:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero", type=int, default=2, help="ZeRO stage 0-3")
    parser.add_argument("--devices", type=int, default=2, help="processes")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--precision", default="bf16-mixed")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    pl.seed_everything(0)
    table = LossTable(every=5)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=MemOptStrategy(zero=args.zero),
        precision=args.precision,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[table],
    )
    trainer.fit(CausalLM(hidden_size=64, num_layers=2, lr=3e-3), TextDataModule(batch_size=8, seq_len=64, stride=16))


if __name__ == "__main__":
    main()
