"""MemOptStrategy's expandable segments: on for the fit unless the user configured the allocator, off after it."""

import lightning.pytorch as pl
import pytest
import torch
from tiny_llm import CausalLM, TextDataModule

from lightning_memopt import MemOptStrategy
from lightning_memopt.core import compat
from lightning_memopt.core.compat import ALLOC_CONF_VARIABLES
from lightning_memopt.lightning.strategies.allocator import expandable_segments_for_fit, restore_allocator
from lightning_memopt.predictor.device import expandable_from_env


@pytest.fixture
def unset_allocator(monkeypatch):
    """No allocator variable, and torch's settings put back after the test."""
    for name in ALLOC_CONF_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    before = expandable_from_env()
    yield
    compat.set_allocator_settings(f"expandable_segments:{before}")


def test_the_default_turns_expandable_segments_on_for_the_fit_and_off_after(unset_allocator):
    restore = expandable_segments_for_fit(None)
    assert expandable_from_env()  # what the predictor reads now: the live setting
    restore_allocator(restore)
    assert not expandable_from_env()


@pytest.mark.parametrize("conf", ["max_split_size_mb:128", "expandable_segments:False"])
def test_a_configured_allocator_is_left_alone(unset_allocator, monkeypatch, conf):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", conf)
    assert expandable_segments_for_fit(None) is None
    assert not expandable_from_env()


def test_opting_out_changes_nothing(unset_allocator):
    assert expandable_segments_for_fit(False) is None
    assert not expandable_from_env()


@pytest.mark.parametrize(
    ("conf", "value", "error", "message"),
    [
        (None, "yes", TypeError, "Expected `expandable_segments` True, False or None, got 'yes'"),
        ("expandable_segments:False", True, ValueError, "PYTORCH_CUDA_ALLOC_CONF='expandable_segments:False'"),
        ("backend:cudaMallocAsync", True, ValueError, "Fix: drop `expandable_segments=True`"),
    ],
)
def test_contradicting_settings_are_refused_at_construction(monkeypatch, conf, value, error, message):
    for name in ALLOC_CONF_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if conf is not None:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", conf)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        MemOptStrategy(zero=0, expandable_segments=value)


def test_a_cpu_fit_leaves_the_allocator_settings_alone(unset_allocator, tmp_path):
    before = compat.allocator_options()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=MemOptStrategy(zero=0), max_steps=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(CausalLM(hidden_size=32, num_layers=1), TextDataModule(batch_size=2, seq_len=16))
    assert compat.allocator_options() == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_fit_reserves_expandable_segments_and_restores_the_setting(unset_allocator, tmp_path):
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, *_):
            segments = torch.cuda.memory_snapshot()
            seen["expandable"] = any(s.get("is_expandable") for s in segments)
            seen["predicted"] = expandable_from_env()

    torch.cuda.empty_cache()  # segments reserved before the fit would stay native
    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy=MemOptStrategy(zero=2), precision="bf16-mixed",
                         max_steps=2, logger=False, callbacks=[Probe()], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(CausalLM(hidden_size=256, num_layers=2), TextDataModule(batch_size=4, seq_len=128))
    assert seen == {"expandable": True, "predicted": True}
    assert not expandable_from_env()
