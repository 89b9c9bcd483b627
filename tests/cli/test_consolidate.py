"""``lightning-memopt consolidate``: a checkpoint saved by a real (single-process) MemOptStrategy run."""

import json

import lightning.pytorch as pl
import pytest
import torch
from tiny_llm import CausalLM, TextDataModule

from lightning_memopt import MemOptStrategy
from lightning_memopt.cli import main


@pytest.mark.parametrize("zero", [0, 1, 3])
def test_consolidate_writes_a_strict_fp32_state_dict(tmp_path, zero):
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=MemOptStrategy(zero=zero), precision="32-true", max_steps=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    model = CausalLM(num_layers=1, hidden_size=32)
    trainer.fit(model, TextDataModule(batch_size=2, seq_len=16))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    trained = {k: v.detach().clone() for k, v in trainer.lightning_module.state_dict().items()}
    trainer.strategy.barrier()

    assert main(["consolidate", str(tmp_path / "run.ckpt"), str(tmp_path / "model.pt")]) == 0
    fresh = CausalLM(num_layers=1, hidden_size=32)
    state = torch.load(tmp_path / "model.pt", weights_only=False)["state_dict"]
    fresh.load_state_dict(state, strict=True)
    if zero != 3:  # ZeRO-3's module holds partitions only; the fp32 values are checked in the 2-rank tests
        for key, value in fresh.state_dict().items():
            torch.testing.assert_close(value, trained[key].float(), msg=key)


def test_consolidate_json(tmp_path, capsys):
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=MemOptStrategy(zero=2), precision="32-true", max_steps=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(CausalLM(num_layers=1, hidden_size=32), TextDataModule(batch_size=2, seq_len=16))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    trainer.strategy.barrier()
    capsys.readouterr()  # the run's own output
    assert main(["consolidate", str(tmp_path / "run.ckpt"), str(tmp_path / "model.pt"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    state = torch.load(tmp_path / "model.pt", weights_only=False)["state_dict"]
    assert data == {"output_file": str(tmp_path / "model.pt"), "tensors": len(state),
                    "bytes": sum(t.numel() * 4 for t in state.values())}  # fmt: skip


def test_consolidate_a_missing_directory_exits_2(tmp_path, capsys):
    assert main(["consolidate", str(tmp_path / "nope"), str(tmp_path / "out.pt")]) == 2
    assert "Expected a DeepSpeed checkpoint directory" in capsys.readouterr().err
