"""MemOptStrategy from YAML through LightningCLI (the configs shipped in examples/configs)."""

from pathlib import Path

import pytest
from cli import main

from lightning_memopt import MemOptStrategy

CONFIGS = Path(__file__).resolve().parents[3] / "examples" / "configs"


@pytest.mark.parametrize(("config", "zero", "offload"), [("zero2.yaml", 2, None), ("zero3_offload.yaml", 3, "cpu")])
def test_yaml_config_builds_and_trains_with_the_strategy(tmp_path, config, zero, offload):
    cli = main(["fit", "--config", str(CONFIGS / config), "--trainer.devices", "1", "--trainer.max_steps", "2",
                "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    strategy = cli.trainer.strategy
    assert isinstance(strategy, MemOptStrategy)
    assert (strategy.zero_stage, strategy.offload_parameters) == (zero, offload)
    assert strategy.config["zero_optimization"]["stage"] == zero
    assert cli.trainer.global_step == 2


LIGHTNING_NAMES = """
trainer:
  strategy:
    class_path: lightning_memopt.MemOptStrategy
    init_args:
      stage: 3
      offload_optimizer: true
      offload_parameters: true
      offload_optimizer_device: cpu
      offload_params_device: cpu
      logging_batch_size_per_gpu: 2
      allgather_partitions: true
      sub_group_size: 100000000
      loss_scale: 0.0
      initial_scale_power: 16
"""


def test_yaml_with_lightnings_argument_names_trains(tmp_path):
    """A YAML written for Lightning's DeepSpeedStrategy works after swapping the class_path."""
    config = tmp_path / "lightning.yaml"
    config.write_text(LIGHTNING_NAMES)
    cli = main(["fit", "--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "2", "--trainer.logger", "false",
                "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                "--data.batch_size", "2", "--data.seq_len", "32", "--model.hidden_size", "32",
                "--model.num_layers", "1"])
    strategy = cli.trainer.strategy
    assert (strategy.zero_stage, strategy.offload_optimizer, strategy.offload_parameters) == (3, "cpu", "cpu")
    assert strategy.config["zero_optimization"]["sub_group_size"] == 100_000_000
    assert strategy.deepspeed_engine.train_micro_batch_size_per_gpu() == 2
    assert cli.trainer.global_step == 2
