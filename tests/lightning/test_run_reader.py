"""The run reader shared by MemoryMonitor, BatchPlanner and budget checkpointing: the training loader is built once
and ``configure_optimizers`` called once per fit (counted), except where a change asks for a new one; nothing is left
on the module or the Trainer after the fit, also when it fails. One process on CPU.

Before the run reader (commit 00abc9b), the first fit below built the loader 6 times and called
``configure_optimizers`` 4 times before step one.
"""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from tiny_llm import CausalLM, TextDataModule
from torch.utils._python_dispatch import _get_current_dispatch_mode

from lightning_memopt import MemOptStrategy
from lightning_memopt.lightning._run_reader import _KEY
from lightning_memopt.lightning.callbacks import BatchPlanner, MemoryDoesNotFitError, MemoryMonitor
from lightning_memopt.transforms import applied_transforms

SEQ = 32


class CountingData(TextDataModule):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loader_builds = 0

    def train_dataloader(self):
        self.loader_builds += 1
        return super().train_dataloader()


class CountingLM(CausalLM):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stepping_batches: list[int] = []  # what each configure_optimizers call saw

    def configure_optimizers(self):
        self.stepping_batches.append(self.trainer.estimated_stepping_batches)
        return super().configure_optimizers()


class AtStepOne(pl.Callback):
    def __init__(self, data: CountingData) -> None:
        self.data, self.counts, self.batch_shape = data, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.counts is None:
            self.counts = (self.data.loader_builds, len(pl_module.stepping_batches))
            self.batch_shape = tuple(batch.shape)


def _fit(tmp_path, data, module, callbacks, strategy=None, **trainer_kwargs) -> pl.Trainer:
    step_one = AtStepOne(data)
    kwargs = {"max_steps": 2, **trainer_kwargs}
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision="bf16-mixed", logger=CSVLogger(tmp_path),
        strategy=strategy or MemOptStrategy(zero=1, activation_checkpointing="budget", memory_budget="1GiB"),
        callbacks=[*callbacks, step_one], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, **kwargs,
    )  # fmt: skip
    trainer.fit(module, data)
    trainer.step_one = step_one
    return trainer


def _callbacks(global_batch: int) -> list:
    return [BatchPlanner(global_batch_tokens=global_batch * SEQ, device_memory="1GiB"),
            MemoryMonitor(device_memory="1GiB", log_every_n_steps=1, plot=False)]  # fmt: skip


def test_monitor_planner_and_budget_checkpointing_build_the_loader_once_and_configure_optimizers_once(tmp_path):
    data, module = CountingData(batch_size=4, seq_len=SEQ), CountingLM(hidden_size=64, num_layers=2)
    trainer = _fit(tmp_path, data, module, _callbacks(global_batch=4))  # the plan keeps micro-batch 4
    assert trainer.step_one.counts == (1, 1)  # before step one, Lightning's own build and call included
    assert (data.loader_builds, len(module.stepping_batches)) == (1, 1)
    assert trainer.step_one.batch_shape == (4, SEQ)  # the batch the reader read is trained on, first
    assert trainer.callbacks[0].result["micro_batch_size"] == 4
    assert applied_transforms(module)["checkpoint_plan"]["num_checkpointed"] == 0  # planned with the run's batch
    assert trainer.callbacks[1].estimate.details["micro_batch_size"] == 4
    assert "configure_optimizers" not in module.__dict__ and _KEY not in trainer.__dict__


def test_a_plan_that_changes_the_micro_batch_rebuilds_the_loader_and_the_lr_schedule_sees_it(tmp_path):
    """The loader is built again for the planned micro-batch (its batch size is fixed at construction), and
    ``configure_optimizers`` runs again: an LR schedule sized by ``estimated_stepping_batches`` sees the plan."""
    data, module = CountingData(batch_size=4, seq_len=SEQ), CountingLM(hidden_size=64, num_layers=2)
    trainer = _fit(tmp_path, data, module, _callbacks(global_batch=8), max_steps=-1, max_epochs=1,
                   limit_train_batches=0.05)  # 46 batches of 4 -> 2 steps; 23 batches of 8 -> 1 step  # fmt: skip
    assert trainer.step_one.counts == (2, 2)
    assert trainer.step_one.batch_shape == (8, SEQ)
    assert module.stepping_batches == [2, 1]  # the call the Trainer used (the last) saw the planned run
    assert trainer.estimated_stepping_batches == trainer.global_step == 1


def test_parameters_created_after_the_read_get_their_own_configure_optimizers(tmp_path):
    """A handed-over result is dropped when the module's parameters changed since it was made (configure_model)."""

    class GrowsInConfigureModel(CountingLM):
        def configure_model(self) -> None:
            if not hasattr(self, "extra"):
                self.extra = torch.nn.Parameter(torch.zeros(3))

        def training_step(self, batch, batch_idx):  # traced by the planner before configure_model ran
            loss = super().training_step(batch, batch_idx)
            return loss + self.extra.sum() if hasattr(self, "extra") else loss

    data, module = CountingData(batch_size=4, seq_len=SEQ), GrowsInConfigureModel(hidden_size=64, num_layers=2)
    trainer = _fit(tmp_path, data, module, _callbacks(global_batch=4)[:1], strategy="auto")
    assert len(module.stepping_batches) == 2  # the planner's call (before configure_model), then the Trainer's
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(module.extra) in optimized and optimized == {id(p) for p in module.parameters()}


@pytest.mark.parametrize("cpu_mode", ["dispatch", "allocator"])
def test_a_fit_that_fails_in_setup_leaves_nothing_behind(tmp_path, cpu_mode):
    from lightning_memopt.measuring.cpu_allocator import CPUAllocationCounter

    data, module = CountingData(batch_size=4, seq_len=SEQ), CountingLM(hidden_size=64, num_layers=2)
    monitor = MemoryMonitor(device_memory=1, cpu_mode=cpu_mode)  # 1 byte: the fit check fails in setup
    with pytest.raises(MemoryDoesNotFitError):
        _fit(tmp_path, data, module, [monitor], strategy="auto")
    assert len(module.stepping_batches) == 1  # read for the prediction, never handed over
    assert "configure_optimizers" not in module.__dict__
    assert _KEY not in module.trainer.__dict__
    assert _get_current_dispatch_mode() is None  # the dispatch tracker was left
    assert not CPUAllocationCounter.installed()  # the counting allocator was put back
