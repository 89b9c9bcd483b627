"""MemOptStrategy as a drop-in for Lightning's DeepSpeedStrategy, on CPU with 2 processes, launched by the tests.

The DeepSpeed config comes from ``PL_DEEPSPEED_CONFIG_PATH`` (ZeRO-3, ``train_micro_batch_size_per_gpu`` 2 while
the DataLoader's batch size is 4). Fit 3 steps with a checkpoint, then validate/test/predict from that checkpoint
with the same Trainer (after fit) and with a new Trainer and a new, differently initialised model (without fit).
Each rank writes what it saw to ``OUT/rank{r}.json``, and at exit whether the process group still exists (the
strategy's own exit handler, registered later, runs first) to ``OUT/exit_rank{r}.json``.
"""

import argparse
import atexit
import json
import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "examples"))
from tiny_llm import CausalLM, TextDataModule

from lightning_memopt import MemOptStrategy


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=MemOptStrategy(), precision="bf16-mixed", max_epochs=1,
        limit_train_batches=3, limit_val_batches=2, limit_test_batches=2, limit_predict_batches=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )


def evaluate(t: pl.Trainer, model: CausalLM, data: TextDataModule, ckpt_path) -> dict:
    logits = t.predict(model, data, ckpt_path=ckpt_path)[0]
    return {
        "val_loss": t.validate(model, data, ckpt_path=ckpt_path, verbose=False)[0]["val_loss"],
        "test_loss": t.test(model, data, ckpt_path=ckpt_path, verbose=False)[0]["test_loss"],
        "logits_sum": float(logits.float().sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = TextDataModule(batch_size=4, seq_len=32)
    exit_file = args.out / f"exit_rank{os.environ.get('LOCAL_RANK', '0')}.json"
    atexit.register(lambda: exit_file.write_text(json.dumps({"group_at_exit": torch.distributed.is_initialized()})))

    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=args.out / "ckpt", filename="{step}")
    first = trainer(callbacks=[checkpoint])
    model = CausalLM(lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first.fit(model, data)
    engine = first.strategy.deepspeed_engine
    result = {
        "rank": first.global_rank,
        "zero_stage": first.strategy.zero_stage,
        "config_micro": first.strategy.config["train_micro_batch_size_per_gpu"],
        "engine_micro": engine.train_micro_batch_size_per_gpu(),
        "engine_train_batch": engine.train_batch_size(),
        "micro_warnings": sum("train_micro_batch_size_per_gpu" in str(w.message) for w in caught),
        "best": checkpoint.best_model_path,
    }
    result["in_memory"] = evaluate(first, model, data, ckpt_path=None)
    result["after_fit"] = evaluate(first, model, data, ckpt_path="best")

    pl.seed_everything(1)
    untrained = CausalLM(lr=1e-2)
    result["untrained"] = evaluate(trainer(), untrained, data, ckpt_path=None)
    result["without_fit"] = evaluate(trainer(), CausalLM(lr=1e-2), data, ckpt_path=checkpoint.best_model_path)
    (args.out / f"rank{result['rank']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
    atexit._run_exitfuncs()  # what the interpreter runs at exit; then leave without its teardown
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from helpers import end_distributed_run

    end_distributed_run()
