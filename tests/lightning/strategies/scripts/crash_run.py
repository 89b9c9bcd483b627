"""A MemOptStrategy run (ZeRO-2, 2 CPU processes) in which rank 1 dies abruptly, and its resumption.

    crash_run.py --out DIR --crash-at 5         # checkpoints at steps 2 and 4, rank 1 dies before step 5
    crash_run.py --out DIR --resume CKPT        # resumes from CKPT up to step 6

Every rank writes its losses to ``OUT/{mode}_rank{r}.json`` after each step.
"""

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "examples"))
from tiny_llm import CausalLM, TextDataModule

from lightning_memopt import MemOptStrategy

warnings.filterwarnings("ignore")


class LossWriter(pl.Callback):
    def __init__(self, path: Path, crash_at: int) -> None:
        self.path, self.crash_at, self.losses = path, crash_at, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.crash_at and trainer.global_rank == 1:
            os._exit(1)  # a hard crash: no exception handling, no cleanup

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.path.with_name(self.path.name.format(rank=trainer.global_rank)).write_text(json.dumps(self.losses))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--crash-at", type=int, default=0)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    mode = "resume" if args.resume else "crash"
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=MemOptStrategy(zero=2), precision="bf16-mixed", max_steps=6,
        limit_train_batches=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[LossWriter(args.out / f"{mode}_rank{{rank}}.json", args.crash_at),
                   ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")],
    )
    trainer.fit(CausalLM(lr=1e-2), TextDataModule(batch_size=4, seq_len=32), ckpt_path=args.resume)


if __name__ == "__main__":
    main()
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from helpers import end_distributed_run

    end_distributed_run()
