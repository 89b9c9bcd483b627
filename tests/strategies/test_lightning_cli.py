"""MemOptStrategy from YAML through LightningCLI (the configs shipped in examples/configs)."""

from pathlib import Path

import pytest
from cli import main

from lightning_memopt import MemOptStrategy

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"


@pytest.mark.parametrize(("config", "zero", "offload"), [("zero2.yaml", 2, None), ("zero3_offload.yaml", 3, "cpu")])
def test_yaml_config_builds_and_trains_with_the_strategy(tmp_path, config, zero, offload):
    cli = main(["fit", "--config", str(CONFIGS / config), "--trainer.devices", "1", "--trainer.max_steps", "2",
                "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    strategy = cli.trainer.strategy
    assert isinstance(strategy, MemOptStrategy)
    assert (strategy.zero_stage, strategy.offload_parameters) == (zero, offload)
    assert strategy.config["zero_optimization"]["stage"] == zero
    assert cli.trainer.global_step == 2
