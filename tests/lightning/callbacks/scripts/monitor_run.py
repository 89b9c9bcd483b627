"""A 2-process CPU run with MemoryMonitor (and optionally BatchPlanner), launched by the callback tests.

``--strategy memopt --zero Z`` uses MemOptStrategy; ``--strategy ddp`` Lightning's DDP. With ``--plan BYTES`` a
BatchPlanner chooses the micro-batch for ``--global-tokens``. Each rank writes ``OUT/rank{r}.json``: the monitor's
history and summary, the planner's result, the CSV logger's metrics file and the PNG path."""

import argparse
import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "examples"))
from tiny_llm import CausalLM, TextDataModule

from lightning_memopt import MemOptStrategy
from lightning_memopt.lightning.callbacks.batch_planner import BatchPlanner
from lightning_memopt.lightning.callbacks.memory_monitor import MemoryMonitor

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=("memopt", "ddp"), default="memopt")
    parser.add_argument("--zero", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--plan", type=int, default=0, help="device memory in bytes for BatchPlanner (0: none)"
    )
    parser.add_argument("--global-tokens", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--accumulate", type=int, default=1, help="Trainer(accumulate_grad_batches=...)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    strategy = MemOptStrategy(zero=args.zero) if args.strategy == "memopt" else "ddp"
    monitor = MemoryMonitor(log_every_n_steps=1, device_memory=args.plan or None)
    callbacks = [monitor]
    planner = None
    if args.plan:
        planner = BatchPlanner(global_batch_tokens=args.global_tokens, device_memory=args.plan)
        callbacks.insert(0, planner)
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        precision="bf16-mixed",
        max_steps=args.steps,
        logger=CSVLogger(args.out / "logs", name="run"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accumulate_grad_batches=args.accumulate,
    )
    data = TextDataModule(batch_size=args.batch_size, seq_len=64)
    trainer.fit(CausalLM(hidden_size=args.hidden, num_layers=2), data)
    log_dir = trainer.log_dir
    result = {
        "rank": trainer.global_rank,
        "history": monitor.history,
        "summary": monitor.summary(),
        "metrics_csv": str(Path(log_dir) / "metrics.csv"),
        "plot": str(Path(log_dir) / "memory_monitor.png"),
        "planner": planner.result if planner else None,
        "batch_size": data.batch_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "global_step": trainer.global_step,
    }
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from helpers import end_distributed_run

    end_distributed_run()
