"""MemOptStrategy's setup-time config: micro-batch size, DeepSpeed's checkpointing settings, loss scaling.

One process.
"""

import lightning.pytorch as pl
import pytest
import torch
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tiny_llm import CausalLM, TextDataModule
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_memopt import MemOptStrategy


def _trainer(strategy, tmp_path, callbacks=(), **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_steps", 2)
    return pl.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks),
        **kwargs,
    )


def test_a_micro_batch_size_in_the_config_is_kept_and_warned_about_once(tmp_path):
    config = {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 8}
    trainer = _trainer(MemOptStrategy(config=config), tmp_path, max_steps=3)
    with pytest.warns(UserWarning, match=r"`train_micro_batch_size_per_gpu` \(8\) differs from the training") as seen:
        trainer.fit(CausalLM(num_layers=1, hidden_size=32), TextDataModule(batch_size=2, seq_len=16))
    assert sum("train_micro_batch_size_per_gpu" in str(w.message) for w in seen) == 1
    assert trainer.strategy.deepspeed_engine.train_micro_batch_size_per_gpu() == 8
    assert trainer.global_step == 3


class _Batches(Dataset):
    """Yields whole batches, for ``DataLoader(batch_size=None)``."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.arange(3 * 16).reshape(3, 16) % 256


class _BatchedData(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Batches(), batch_size=None)


def test_a_loader_without_batch_size_needs_the_size_given(tmp_path):
    """Lightning dies in `_auto_select_batch_size` with an AttributeError here; the strategy says what it needs."""
    with pytest.raises(MisconfigurationException, match="Expected a training DataLoader with a batch size") as err:
        _trainer(MemOptStrategy(zero=1), tmp_path).fit(CausalLM(num_layers=1, hidden_size=32), _BatchedData())
    assert "logging_batch_size_per_gpu=N" in str(err.value)
    trainer = _trainer(MemOptStrategy(zero=1, logging_batch_size_per_gpu=3), tmp_path)
    trainer.fit(CausalLM(num_layers=1, hidden_size=32), _BatchedData())
    assert trainer.global_step == 2
    assert trainer.strategy.deepspeed_engine.train_micro_batch_size_per_gpu() == 3


class _DeepSpeedCheckpointed(pl.LightningModule):
    """Calls ``deepspeed.checkpointing.checkpoint`` on its hidden layer; records DeepSpeed's settings in the step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.hidden, self.out = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 1)
        self.seen: dict[str, bool] = {}
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        import deepspeed

        self.seen = {name: getattr(ds_checkpointing, name) for name in ("PARTITION_ACTIVATIONS", "CPU_CHECKPOINT",
                                                                         "SYNCHRONIZE")}
        x = torch.tanh(self.inp(batch))
        x = deepspeed.checkpointing.checkpoint(lambda t: torch.tanh(self.hidden(t)), x)
        loss = self.out(x).pow(2).mean()
        self.losses.append(float(loss))
        return loss

    def train_dataloader(self):
        return DataLoader(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_deepspeeds_checkpointing_settings_are_configured_for_the_fit_and_restored(tmp_path):
    names = ("PARTITION_ACTIVATIONS", "CPU_CHECKPOINT", "SYNCHRONIZE")
    before = {name: getattr(ds_checkpointing, name) for name in names}
    plain = _DeepSpeedCheckpointed()
    _trainer(MemOptStrategy(zero=2), tmp_path, max_steps=3, precision="32-true").fit(plain)
    knobs = _DeepSpeedCheckpointed()
    strategy = MemOptStrategy(zero=2, partition_activations=True, cpu_checkpointing=True,
                              synchronize_checkpoint_boundary=True)
    _trainer(strategy, tmp_path, max_steps=3, precision="32-true").fit(knobs)
    assert knobs.seen == {"PARTITION_ACTIVATIONS": True, "CPU_CHECKPOINT": True, "SYNCHRONIZE": True}
    assert knobs.losses == pytest.approx(plain.losses, rel=1e-6)  # the same training, activations stored elsewhere
    assert {name: getattr(ds_checkpointing, name) for name in before} == before


def test_contiguous_checkpoint_buffers_need_their_size_at_setup(tmp_path):
    strategy = MemOptStrategy(zero=2, partition_activations=True, contiguous_memory_optimization=True)
    assert strategy.config["activation_checkpointing"]["contiguous_memory_optimization"] is True
    with pytest.raises(MisconfigurationException, match=r"Expected \['number_checkpoints'\] in the DeepSpeed config"):
        _trainer(strategy, tmp_path, precision="32-true").fit(_DeepSpeedCheckpointed())


def test_loss_scaling_arguments_warn_that_bf16_does_not_use_them(tmp_path):
    trainer = _trainer(MemOptStrategy(zero=1, initial_scale_power=10), tmp_path, precision="bf16-mixed")
    with pytest.warns(UserWarning, match=r"loss-scaling arguments \['initial_scale_power'\] apply only to precision"):
        trainer.fit(CausalLM(num_layers=1, hidden_size=32), TextDataModule(batch_size=2, seq_len=16))
    assert "fp16" not in trainer.strategy.config and trainer.strategy.config["bf16"]["enabled"]


def test_offload_written_as_false_in_a_config_means_no_offload(tmp_path):
    """Older configs (and Lightning's tests) write `"offload_optimizer": false`, which DeepSpeed 0.19 rejects."""
    strategy = MemOptStrategy(config={"zero_optimization": {"stage": 2, "offload_optimizer": False}})
    trainer = _trainer(strategy, tmp_path)
    trainer.fit(CausalLM(num_layers=1, hidden_size=32), TextDataModule(batch_size=2, seq_len=16))
    assert trainer.global_step == 2 and "offload_optimizer" not in trainer.strategy.config["zero_optimization"]
