"""MemoryMonitor predicts steps that log, reduce, gather, read values and optimize manually, with no warning.

The issue's module (a tiny Phi-3 whose step logs and reads ``strategy.reduce(loss).item()``) runs with 2 processes
under MemOptStrategy (``scripts/steps_run.py``): ZeRO 0 and 3 in the quick set, 1 and 2 marked slow. The Lightning
calls one by one run in this process on a single device. The accuracy target is the monitor's: worst error 3 %
from the second optimizer step on (the first step's peak comes before its optimizer states exist).
"""

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from tiny_llm import CausalLM, TextDataModule

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from monitor_launch import HERE

from helpers import run_script
from lightning_memopt.lightning.callbacks.memory_monitor import MemoryMonitor

TARGET = 0.03
SCRIPT = HERE / "steps_run.py"


def _errors(history: "list[dict]") -> "list[float]":
    """The errors from the second logged step on (the first optimizer steps create the optimizer states)."""
    first = min(h["step"] for h in history)
    return [h["prediction_error"] for h in history if h["step"] > first]


# ---------------------------------------------------------------------------------------------------- 2 processes
def _two_rank_phi3(tmp_path: Path, zero: int) -> None:
    import json

    run_script(SCRIPT, "--zero", str(zero), "--out", str(tmp_path), timeout=600)
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(ranks) == 2
    for rank in ranks:
        assert rank["warnings"] == []  # predicted: no "cannot predict"
        assert rank["losses"] == 4  # the step's list holds the real steps' values only
    history = ranks[0]["history"]
    assert sorted({h["rank"] for h in history}) == [0, 1]
    errors = _errors(history)
    assert errors and max(map(abs, errors)) <= TARGET, errors
    depends = ranks[0]["details"]["depends_on_batch"]
    assert len(depends) == 1 and depends[0].startswith("aten._local_scalar_dense at ") and "steps_run.py:" in depends[0]
    first = next(m for m in ranks[0]["messages"] if "predicted memory per rank" in m)
    assert depends[0] in first  # the monitor's first message says where the prediction depends on the batch


@pytest.mark.distributed
@pytest.mark.parametrize("zero", [pytest.param(0, marks=pytest.mark.slow), 3])  # 1 and 2 below, slow too
def test_phi3_step_that_logs_and_reads_a_reduced_loss_is_predicted_at_every_step(tmp_path, zero):
    _two_rank_phi3(tmp_path, zero)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("zero", [1, 2])
def test_phi3_step_that_logs_and_reads_a_reduced_loss_is_predicted_at_zero_1_and_2(tmp_path, zero):
    _two_rank_phi3(tmp_path, zero)


# ---------------------------------------------------------------------------------------------------- one process
class Gathers(CausalLM):
    """``self.log`` of a torchmetrics metric, ``self.all_gather``, ``strategy.reduce``, ``.item()``, ``.tolist()``."""

    def __init__(self) -> None:
        super().__init__(hidden_size=64, num_layers=2)
        from torchmetrics.classification import MulticlassAccuracy

        self.accuracy = MulticlassAccuracy(num_classes=256)
        self.seen: list = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self.model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch.flatten())
        self.accuracy(logits.argmax(-1), batch)
        self.log("acc", self.accuracy)
        gathered = self.all_gather(loss.detach())
        self.seen.append((self.trainer.strategy.reduce(gathered.mean()).item(), batch[:, 0].tolist()))
        return loss


class ManualGAN(CausalLM):
    """Manual optimization with two optimizers, an LR scheduler, ``toggle_optimizer``, ``self.clip_gradients`` and
    ``clip_grad_norm_``: a generator (the body) and a critic (the head) stepped one after the other, both zeroed
    first."""

    def __init__(self) -> None:
        super().__init__(hidden_size=64, num_layers=2)
        self.automatic_optimization = False

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        gen, critic = self.optimizers()
        body, head = self.model.model, self.model.lm_head
        gen.zero_grad()
        critic.zero_grad()
        self.toggle_optimizer(gen)
        hidden = body(input_ids=batch).last_hidden_state
        gen_loss = torch.nn.functional.cross_entropy(head(hidden).flatten(0, 1).float(), batch.flatten())
        self.manual_backward(gen_loss)
        self.clip_gradients(gen, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        gen.step()
        self.untoggle_optimizer(gen)
        critic_loss = head(hidden.detach()).float().logsumexp(-1).mean()
        self.manual_backward(critic_loss)
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        critic.step()
        self.lr_schedulers().step()
        self.log("gen_loss", gen_loss.item())

    def configure_optimizers(self):
        gen = torch.optim.AdamW(self.model.model.parameters(), lr=1e-3)
        critic = torch.optim.AdamW(self.model.lm_head.parameters(), lr=1e-3)
        return [gen, critic], [torch.optim.lr_scheduler.StepLR(gen, 10)]


class Untraceable(CausalLM):
    def __init__(self) -> None:
        super().__init__(hidden_size=64, num_layers=2)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.last = loss.detach().numpy()  # a fake tensor has no data
        return loss


def _fit(tmp_path: Path, module: pl.LightningModule, **trainer_kwargs) -> "tuple[MemoryMonitor, list[str]]":
    monitor = MemoryMonitor(log_every_n_steps=1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=CSVLogger(tmp_path, name="run"),
                         callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                         **trainer_kwargs)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, TextDataModule(batch_size=4, seq_len=32))
    assert trainer.global_step >= 3  # manual optimization counts every optimizer's step
    return monitor, [str(w.message) for w in caught if "MemoryMonitor" in str(w.message)]


def test_log_metrics_all_gather_reduce_and_item_are_stepped_over(tmp_path):
    module = Gathers()
    monitor, warned = _fit(tmp_path, module, precision="bf16-mixed")
    assert warned == []
    errors = _errors(monitor.history)
    assert errors and max(map(abs, errors)) <= TARGET, errors
    assert len(module.seen) == 3  # the real steps' values only
    assert any("aten._local_scalar_dense" in d for d in monitor.estimate.details["depends_on_batch"])


@pytest.mark.parametrize("kwargs", [{}, {"gradient_clip_val": 1.0}], ids=["plain", "lightning_clipping"])
def test_automatic_optimization_with_lightning_gradient_clipping_is_predicted(tmp_path, kwargs):
    monitor, warned = _fit(tmp_path, CausalLM(hidden_size=64, num_layers=2), **kwargs)
    assert warned == []
    errors = _errors(monitor.history)
    assert errors and max(map(abs, errors)) <= TARGET, errors


def test_manual_optimization_with_two_optimizers_and_clipping_is_predicted(tmp_path):
    monitor, warned = _fit(tmp_path, ManualGAN())
    assert warned == []
    errors = _errors(monitor.history)
    assert errors and max(map(abs, errors)) <= TARGET, errors


def test_a_step_that_cannot_be_traced_warns_once_with_the_users_line_and_trains(tmp_path):
    import inspect

    lines, first = inspect.getsourcelines(Untraceable)
    line = first + next(i for i, text in enumerate(lines) if ".numpy()" in text)
    monitor, warned = _fit(tmp_path, Untraceable())
    assert monitor.estimate is None and len(warned) == 1
    assert "cannot predict" in warned[0] and f"{__file__}:{line}" in warned[0]
