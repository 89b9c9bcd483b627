"""One node of a simulated 2-node job (1 process per node), started by torchrun: ZeRO-3 for 3 steps.
Each rank writes ``OUT/rank{r}.json`` with its node rank, world size and losses."""

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "examples"))
from tiny_llm import CausalLM, TextDataModule

from lightning_memopt import MemOptStrategy

warnings.filterwarnings("ignore")
PROBE = torch.arange(64).reshape(2, 32)


class Probe(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.losses.append(float(pl_module.model(input_ids=PROBE, labels=PROBE).loss))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    probe = Probe()
    trainer = pl.Trainer(accelerator="cpu", num_nodes=2, devices=1, strategy=MemOptStrategy(zero=3),
                         precision="bf16-mixed", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
    trainer.fit(CausalLM(lr=1e-2), TextDataModule(batch_size=4, seq_len=32))
    env = trainer.strategy.cluster_environment
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "node_rank": trainer.node_rank, "world_size": trainer.world_size, "environment": type(env).__name__,
        "probe": probe.losses,
    }))
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from helpers import end_distributed_run

    end_distributed_run()
