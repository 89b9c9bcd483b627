"""One MemOptStrategy run on CPU, launched by the tests: fit 6 steps (checkpoint at step 3), resume from step 3 in a
new Trainer, validate/test/predict, save and consolidate. Each rank writes what it saw to ``OUT/rank{r}.json``."""

import argparse
import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "examples"))
from tiny_llm import CausalLM, TextDataModule

from lightning_memopt import MemOptStrategy
from lightning_memopt.lightning.consolidate import consolidate_checkpoint
from lightning_memopt.measuring.zero_state import model_state_bytes

warnings.filterwarnings("ignore")
PROBE = torch.arange(2 * 32).reshape(2, 32) % 256  # the same batch on every rank


class Recorder(pl.Callback):
    """Per step: the local training loss, and the loss of a fixed probe batch after the update (equal on every
    rank when the replicas agree). At step 2, the engine's model-state bytes before and after the optimizer step."""

    def __init__(self) -> None:
        self.train_losses: dict[int, float] = {}
        self.probe_losses: dict[int, float] = {}
        self.states: dict[str, dict[str, int]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 1:
            self.states["before_step"] = model_state_bytes(trainer.strategy.model).to_dict()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        self.train_losses[step] = float(outputs["loss"])
        with torch.no_grad():
            self.probe_losses[step] = float(pl_module.model(input_ids=PROBE, labels=PROBE).loss)
        if step == 2:
            self.states["after_step"] = model_state_bytes(trainer.strategy.model).to_dict()


class PredictRecorder(pl.Callback):
    def __init__(self) -> None:
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.pairs.append((batch.clone(), outputs.float().clone()))


def trainer(args, callbacks, **kwargs) -> pl.Trainer:
    strategy = MemOptStrategy(zero=args.zero, activation_checkpointing=args.checkpointing)
    return pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, precision=args.precision, max_steps=6,
        limit_train_batches=3, limit_val_batches=2, limit_test_batches=2, limit_predict_batches=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks, **kwargs,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero", type=int, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()
    data = TextDataModule(batch_size=args.batch_size, seq_len=32)

    pl.seed_everything(0)
    straight = Recorder()
    ckpt = ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    first = trainer(args, [straight, ckpt], check_val_every_n_epoch=100)
    first.fit(CausalLM(lr=1e-2), data)
    result = {"rank": first.global_rank, "world_size": first.world_size, "straight": straight.train_losses,
              "probe": straight.probe_losses, "states": straight.states,
              "n_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in first.lightning_module.parameters()),
              "persistent": sum(p.ds_numel for p in first.lightning_module.parameters()
                                if getattr(p, "ds_persist", False))}
    if not args.no_resume:
        pl.seed_everything(0)
        resumed, predictions = Recorder(), PredictRecorder()
        second = trainer(args, [resumed, predictions], check_val_every_n_epoch=100)
        model = CausalLM(lr=1e-2)
        second.fit(model, data, ckpt_path=str(args.out / "ckpt" / "step=3.ckpt"))
        result["resumed"] = resumed.train_losses
        second.save_checkpoint(args.out / "final.ckpt")
        result["validate"] = second.validate(model, data, verbose=False)[0]
        result["test"] = second.test(model, data, verbose=False)[0]
        second.predict(model, data, return_predictions=False)
        torch.save(predictions.pairs, args.out / f"predictions{second.global_rank}.pt")
        second.strategy.barrier()
        if second.global_rank == 0:
            consolidate_checkpoint(args.out / "final.ckpt", args.out / "consolidated.pt")
    (args.out / f"rank{result['rank']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from helpers import end_distributed_run

    end_distributed_run()
