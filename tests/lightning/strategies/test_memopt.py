"""MemOptStrategy: construction, registry, config validation and setup errors (single process, fast)."""

import json
import re

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tiny_llm import CausalLM, TextDataModule

from lightning_memopt import MemOptStrategy


def test_defaults_build_a_zero2_config():
    strategy = MemOptStrategy()
    assert strategy.zero_stage == 2
    assert strategy.config["zero_optimization"]["stage"] == 2
    assert "offload_optimizer" not in strategy.config["zero_optimization"]


@pytest.mark.parametrize(
    ("name", "zero", "offload"),
    [
        ("memopt_zero1", 1, None),
        ("memopt_zero2", 2, None),
        ("memopt_zero3", 3, None),
        ("memopt_zero3_offload", 3, "cpu"),
    ],
)
def test_registered_names(name, zero, offload):
    assert name in StrategyRegistry
    strategy = StrategyRegistry.get(name)
    assert isinstance(strategy, MemOptStrategy)
    assert strategy.zero_stage == zero
    assert strategy.offload_parameters == offload


def test_trainer_accepts_a_registered_name():
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="memopt_zero3", logger=False)
    assert isinstance(trainer.strategy, MemOptStrategy)
    assert trainer.strategy.zero_stage == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"zero": 4}, "Expected `zero` to be one of 0, 1, 2, 3"),
        ({"zero": -1}, "Expected `zero` to be one of 0, 1, 2, 3"),
        ({"zero": 2, "offload_parameters": "cpu"}, "Expected `zero=3` with `offload_parameters='cpu'`"),
        ({"zero": 0, "offload_optimizer": True}, "Expected `zero` in 1, 2, 3 with `offload_optimizer='cpu'`"),
        ({"zero": 3, "offload_optimizer": "nvme"}, "Expected `nvme_path`"),
        ({"zero": 3, "offload_optimizer": "disk"}, "Expected `offload_optimizer` to be False, True, 'cpu' or 'nvme'"),
        ({"reduce_bucket_size": 0}, "Expected `reduce_bucket_size` to be 'auto' or an int >= 1"),
        ({"config": {"zero_optimization": {"stage": 1}}, "zero": 3}, "Expected `zero` to match the zero_optimization"),
        ({"config": {"zero_optimization": {"stage": 1}}, "offload_optimizer": "cpu"}, "Expected either `config` or"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        MemOptStrategy(**kwargs)
    assert ", got " in str(err.value)  # says what was received, not only what was expected


def test_config_path_is_loaded_and_its_stage_used(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    strategy = MemOptStrategy(config=str(path))
    assert strategy.zero_stage == 3
    assert strategy.offload_parameters == "cpu"


def _fit(strategy, tmp_path, model=None, **trainer_kwargs):
    trainer_kwargs = {"max_steps": 1, **trainer_kwargs}
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **trainer_kwargs,
    )
    trainer.fit(model or CausalLM(num_layers=1, hidden_size=32), TextDataModule(batch_size=2, seq_len=16))
    return trainer


def test_fp16_on_cpu_is_refused_at_setup(tmp_path):
    with pytest.raises(MisconfigurationException, match="Expected a precision DeepSpeed can run on CPU"):
        _fit(MemOptStrategy(zero=1), tmp_path, precision="16-mixed")


def test_gradient_clipping_by_value_is_refused(tmp_path):
    with pytest.raises(MisconfigurationException, match="clipping gradients by value"):
        _fit(MemOptStrategy(zero=1), tmp_path, gradient_clip_val=1.0, gradient_clip_algorithm="value")


def test_config_contradicting_the_trainer_is_refused(tmp_path):
    config = {"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 4}
    with pytest.raises(MisconfigurationException, match="`gradient_accumulation_steps` to equal"):
        _fit(MemOptStrategy(config=config), tmp_path, accumulate_grad_batches=2)
    config = {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 2, "train_batch_size": 8}
    with pytest.raises(MisconfigurationException, match="`train_batch_size` to be micro-batch x"):
        _fit(MemOptStrategy(config=config), tmp_path)


def test_a_config_that_agrees_with_the_trainer_trains(tmp_path):
    config = {"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 1, "train_micro_batch_size_per_gpu": 2}
    trainer = _fit(MemOptStrategy(config=config), tmp_path)
    assert trainer.global_step == 1


class _TwoOptimizers(CausalLM):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def configure_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.parameters(), lr=0.1)]


def test_two_optimizers_are_refused(tmp_path):
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=MemOptStrategy(zero=1), max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(MisconfigurationException, match="Expected one optimizer"):
        trainer.fit(_TwoOptimizers(num_layers=1, hidden_size=32), TextDataModule(batch_size=2, seq_len=16))


def test_auto_buckets_follow_the_model_width(tmp_path):
    trainer = _fit(MemOptStrategy(zero=3), tmp_path, precision="32-true")
    zero_config = trainer.strategy.config["zero_optimization"]
    embedding = 256 * 32
    assert zero_config["reduce_bucket_size"] == max(32 * 32, embedding)
    assert zero_config["stage3_param_persistence_threshold"] == 320
    assert zero_config["reduce_bucket_size"] < 200_000_000


def test_transform_options_are_applied_before_deepspeed_wraps_the_model(tmp_path):
    from lightning_memopt.transforms import applied_transforms

    trainer = _fit(MemOptStrategy(zero=1, activation_checkpointing=True, attention="eager"), tmp_path)
    applied = applied_transforms(trainer.lightning_module)
    assert applied["attention"] == "eager"
    assert applied["activation_checkpointing"]["fraction"] == 1.0
    assert len(applied["activation_checkpointing"]["blocks"]) == 1  # the one decoder layer
    assert trainer.lightning_module.model.config._attn_implementation == "eager"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"activation_checkpointing": 1.5}, ValueError, r"Expected `fraction` in \(0, 1\]"),
        ({"attention": "flash3"}, ValueError, "Expected `attention` to be None or one of"),
        ({"liger": {"cross_entropy": True}}, ValueError, "Expected at most one of `cross_entropy`"),
        ({"liger": {"swiglu2": True}}, ValueError, "Expected Liger switches among"),
        ({"liger": "yes"}, TypeError, "Expected `liger` to be a bool or a dict"),
    ],
)
def test_bad_transform_options_raise_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        MemOptStrategy(**kwargs)


def test_liger_on_cpu_is_refused_at_setup(tmp_path):
    with pytest.raises(ValueError, match="Expected a CUDA device for Liger"):
        _fit(MemOptStrategy(zero=1, liger=True), tmp_path)


@pytest.mark.parametrize("fails", [False, True])
def test_zero3_leaves_the_process_as_it_found_it(tmp_path, fails):
    """DeepSpeed's zero.Init replaces torch.nn.functional.linear process-wide and the CPU workaround wraps
    deepspeed.initialize during the call: both are as before after the fit, also when it fails mid-step."""
    import deepspeed

    before = (torch.nn.functional.linear, deepspeed.initialize)

    class Fails(pl.Callback):
        def on_train_batch_end(self, *args) -> None:
            raise RuntimeError("the step failed")

    if fails:
        with pytest.raises(RuntimeError, match="the step failed"):
            _fit(MemOptStrategy(zero=3), tmp_path, precision="32-true", callbacks=[Fails()])
    else:
        _fit(MemOptStrategy(zero=3), tmp_path, precision="32-true")
    assert (torch.nn.functional.linear, deepspeed.initialize) == before


@pytest.mark.parametrize(("zero", "checkpointing"), [(1, False), (2, False), (3, False), (3, True)])
def test_a_fitted_model_runs_and_is_freed_once_the_user_drops_it(tmp_path, zero, checkpointing):
    """DeepSpeed's gradient hooks (ZeRO 1-3), its ``FWD_MODULE_STACK`` (the engine's module, and with checkpointing
    the sub-modules a recomputation pushed) and its coordinator's cache (ZeRO-3) kept every fitted model, its
    partitions and optimizer states alive for the rest of the process; the teardown lets go of them, and the model
    still runs after the fit and still saves."""
    import gc
    import weakref

    def fit_and_use() -> tuple:
        model = CausalLM(num_layers=1, hidden_size=32)
        strategy = MemOptStrategy(zero=zero, activation_checkpointing=checkpointing)
        trainer = _fit(strategy, tmp_path, model, precision="32-true", max_steps=3)
        with torch.no_grad():  # at ZeRO-3 DeepSpeed's module hooks still fetch the partitioned parameters
            logits = model(torch.randint(0, 256, (2, 16)))
        assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()
        trainer.save_checkpoint(tmp_path / "after.ckpt")
        return weakref.ref(model), weakref.ref(trainer.strategy.model)

    model, engine = fit_and_use()
    gc.collect()
    assert model() is None and engine() is None
