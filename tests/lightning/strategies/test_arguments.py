"""MemOptStrategy accepts Lightning's DeepSpeedStrategy arguments with their meaning (construction only, fast)."""

import inspect
import json
import re

import pytest
from deepspeed.runtime.swap_tensor.aio_config import get_aio_config
from lightning.pytorch.strategies import DeepSpeedStrategy

from lightning_memopt import MemOptStrategy

LIGHTNING = inspect.signature(DeepSpeedStrategy.__init__).parameters
OURS = inspect.signature(MemOptStrategy.__init__).parameters
LIGHTNING_DEFAULTS = {name: p.default for name, p in LIGHTNING.items() if p.default is not inspect.Parameter.empty}
#: keys where MemOptStrategy deliberately keeps DeepSpeed's default or sizes to the model (docs/strategy.md)
DIFFERENT_DEFAULTS = {"reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "sub_group_size"}


@pytest.mark.parametrize("name", [name for name in LIGHTNING if name != "self"])
def test_every_argument_of_the_installed_lightning_strategy_is_accepted(name):
    assert name in OURS, f"Lightning's DeepSpeedStrategy takes `{name}`; MemOptStrategy must accept it too"
    assert OURS[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if name in LIGHTNING_DEFAULTS:
        MemOptStrategy(**{name: LIGHTNING_DEFAULTS[name]})  # Lightning's default is accepted as given


def test_all_of_lightnings_defaults_at_once_build_lightnings_zero2(tmp_path):
    """A YAML written for Lightning's strategy lists every default; with or without a config it must construct."""
    strategy = MemOptStrategy(**LIGHTNING_DEFAULTS)
    assert strategy.zero_stage == 2
    assert strategy._bucket_arguments["reduce_bucket_size"] == 200_000_000  # used as given, not "auto"
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert MemOptStrategy(**{**LIGHTNING_DEFAULTS, "config": str(path)}).zero_stage == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stage": 3, "offload_optimizer": True, "offload_parameters": True, "pin_memory": True},
        {"stage": 1, "allgather_partitions": False, "reduce_scatter": False, "contiguous_gradients": False},
        {"stage": 2, "zero_allow_untested_optimizer": False, "logging_batch_size_per_gpu": 7},
        {"partition_activations": True, "cpu_checkpointing": True, "synchronize_checkpoint_boundary": True},
        {"stage": 3, "offload_optimizer": True, "offload_parameters": True, "offload_optimizer_device": "nvme",
         "offload_params_device": "nvme", "params_buffer_count": 7, "params_buffer_size": 10**7, "max_in_cpu": 10**8,
         "optimizer_buffer_count": 6, "block_size": 4096, "queue_depth": 4, "single_submit": True,
         "overlap_events": False},
        {"zero_optimization": False, "stage": 0},
    ],
)
def test_the_config_says_what_lightnings_config_says(kwargs, tmp_path):
    """Key by key, the DeepSpeed config equals the one Lightning builds from the same arguments."""
    if "nvme" in kwargs.values():
        kwargs = {**kwargs, "nvme_path": str(tmp_path)}
    ours, theirs = MemOptStrategy(**kwargs).config, DeepSpeedStrategy(**kwargs).config
    for section in ("activation_checkpointing", "train_micro_batch_size_per_gpu", "zero_allow_untested_optimizer"):
        if section in theirs and (section != "activation_checkpointing" or any(theirs[section].values())):
            assert ours[section] == theirs[section], section
    zero = ours.get("zero_optimization", {})
    for key, value in theirs.get("zero_optimization", {}).items():
        if key in ("offload_optimizer", "offload_param"):
            nvme = value["device"] == "nvme"
            assert zero[key] == {k: v for k, v in value.items() if k != "nvme_path" or (v and nvme)}
        elif key not in DIFFERENT_DEFAULTS:
            assert zero[key] == value, key
    if "nvme" in kwargs.values():
        aio = get_aio_config(ours)  # parsed by DeepSpeed: Lightning's thread_count key is ignored by it
        assert aio["intra_op_parallelism"] == 1 and aio["block_size"] == 4096 and aio["single_submit"] is True


def test_stage_is_lightnings_name_of_zero():
    assert MemOptStrategy(stage=3).zero_stage == 3
    assert MemOptStrategy(zero=1, stage=1).config["zero_optimization"]["stage"] == 1
    assert MemOptStrategy(zero_optimization=False).zero_stage == 0
    assert MemOptStrategy(zero=3).zero_stage == 3  # our name keeps working


def test_thread_count_reaches_deepspeed_under_its_current_name(tmp_path):
    strategy = MemOptStrategy(stage=3, offload_parameters=True, offload_params_device="nvme", nvme_path=str(tmp_path),
                              thread_count=4)
    assert strategy.offload_parameters == "nvme"
    assert get_aio_config(strategy.config)["intra_op_parallelism"] == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"zero": 3, "stage": 1}, "Expected `zero` and `stage` (two names of the ZeRO stage) to agree, got zero=3"),
        ({"zero_optimization": False, "stage": 3}, "Expected no ZeRO stage (or 0) with zero_optimization=False, got"),
        ({"offload_optimizer": "cpu", "offload_optimizer_device": "nvme"}, "to name the same device, got 'cpu' and"),
        ({"offload_optimizer_device": "nvme"}, "Expected `offload_optimizer=True` with `offload_optimizer_device="),
        ({"offload_optimizer": True, "offload_optimizer_device": "gpu"}, "to be 'cpu' or 'nvme', got 'gpu'"),
        ({"queue_depth": 16}, "Expected NVMe offload with the NVMe settings ['queue_depth'], got"),
        ({"stage": 2, "remote_device": "cpu"}, "Expected `zero=3` with `remote_device='cpu'`, got zero=2"),
        ({"stage": 3, "remote_device": "nvme"}, "Expected parameter offload to NVMe with remote_device='nvme', got"),
        ({"logging_batch_size_per_gpu": 0}, "Expected `logging_batch_size_per_gpu` to be 'auto' or an int >= 1, got"),
        ({"stage": 3, "sub_group_size": -1}, "Expected DeepSpeed to accept `zero_optimization.sub_group_size`"),
        ({"loss_scale": -1.0}, "Expected DeepSpeed to accept `fp16.loss_scale` from the strategy's arguments, got"),
        ({"hysteresis": "often"}, "Expected DeepSpeed to accept `fp16.hysteresis`"),
        ({"config": {"fp16": {"enabled": True}}, "loss_scale": 128.0}, "Expected fp16 loss scaling either in"),
        ({"config": {"zero_optimization": {"stage": 2}}, "partition_activations": True}, "Expected either `config`"),
        ({"config": {"zero_optimization": {"stage": 2, "reduce_bucket_size": 0}}}, "`zero_optimization.reduce_bucket"),
        ({"activation_checkpointing": True, "cpu_checkpointing": True}, "Expected either `activation_checkpointing`"),
        ({"activation_checkpointing": True, "config": {"activation_checkpointing": {"partition_activations": True}}},
         "DeepSpeed's checkpointing settings ['partition_activations'], got both"),
    ],
)
def test_contradicting_or_ignored_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        MemOptStrategy(**kwargs)
    assert "Fix:" in str(err.value)


def test_nvme_offload_uses_lightnings_directory_only_when_it_exists(monkeypatch, tmp_path):
    from lightning_memopt.lightning.strategies import arguments

    monkeypatch.setattr(arguments, "LIGHTNING_NVME_PATH", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="Expected `nvme_path`"):
        MemOptStrategy(stage=3, offload_optimizer=True, offload_optimizer_device="nvme")
    monkeypatch.setattr(arguments, "LIGHTNING_NVME_PATH", str(tmp_path))
    strategy = MemOptStrategy(stage=3, offload_optimizer=True, offload_optimizer_device="nvme")
    assert strategy.config["zero_optimization"]["offload_optimizer"]["nvme_path"] == str(tmp_path)


def test_the_config_in_the_environment_variable_is_used_as_lightning_does(monkeypatch, tmp_path):
    config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 3}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("PL_DEEPSPEED_CONFIG_PATH", str(path))
    strategy = MemOptStrategy()
    assert strategy.config == config and strategy.zero_stage == 3
    assert MemOptStrategy(config={"zero_optimization": {"stage": 1}}).zero_stage == 1  # an explicit config wins
    message = "zero_optimization.stage of the config in $PL_DEEPSPEED_CONFIG_PATH"
    with pytest.raises(ValueError, match=re.escape(message)):
        MemOptStrategy(zero=2)
    with pytest.raises(ValueError, match=re.escape("Expected either the config in $PL_DEEPSPEED_CONFIG_PATH or")):
        MemOptStrategy(offload_optimizer=True)


def test_a_config_dict_is_copied_not_changed_by_a_run():
    config = {"zero_optimization": {"stage": 1}}
    strategy = MemOptStrategy(config=config)
    strategy.config["train_micro_batch_size_per_gpu"] = 4  # what a run writes
    assert config == {"zero_optimization": {"stage": 1}}  # a second Trainer with the same dict starts clean


def test_loss_scaling_arguments_are_stored_for_fp16_as_in_lightning():
    from lightning.pytorch.plugins import DeepSpeedPrecision

    kwargs = {"loss_scale": 0.0, "initial_scale_power": 11, "loss_scale_window": 12, "hysteresis": 13,
              "min_loss_scale": 14}
    ours = MemOptStrategy(precision_plugin=DeepSpeedPrecision("16-mixed"), **kwargs)
    theirs = DeepSpeedStrategy(precision_plugin=DeepSpeedPrecision("16-mixed"), **kwargs)
    ours._format_config()  # Lightning's own step that writes the fp16 section (no Trainer: batch keys skipped)
    theirs._format_config()
    assert ours.config["fp16"] == theirs.config["fp16"]
    assert ours.config["fp16"]["initial_scale_power"] == 11
