"""examples/cli.py with each shipped YAML config: the CPU ones fit 2 steps at 1 device (in-process LightningCLI);
the GPU one (checkpointing + Liger + flash) is parsed and its Trainer and strategy constructed."""

from pathlib import Path

import pytest
import torch
from cli import main
from lightning.pytorch.cli import LightningCLI
from tiny_llm import CausalLM, TextDataModule

from lightning_memopt import MemOptStrategy

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
CPU_CONFIGS = ["zero2.yaml", "zero3_offload.yaml"]
GPU_CONFIG = CONFIGS / "checkpointing_liger_flash.yaml"


def test_every_shipped_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted([*CPU_CONFIGS, GPU_CONFIG.name])


@pytest.mark.parametrize("config", CPU_CONFIGS)
def test_cpu_config_fits_two_steps(tmp_path, config):
    cli = main(["fit", "--config", str(CONFIGS / config), "--trainer.devices", "1", "--trainer.max_steps", "2",
                "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    assert isinstance(cli.trainer.strategy, MemOptStrategy)
    assert cli.trainer.global_step == 2


def test_gpu_config_builds_its_strategy(tmp_path):
    overrides = [] if torch.cuda.is_available() else ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    cli = LightningCLI(CausalLM, TextDataModule, run=False,
                       args=["--config", str(GPU_CONFIG), "--trainer.default_root_dir", str(tmp_path), *overrides])
    strategy = cli.trainer.strategy
    assert isinstance(strategy, MemOptStrategy) and strategy.zero_stage == 2
    init_args = cli.config["trainer"]["strategy"]["init_args"]
    assert (init_args["activation_checkpointing"], init_args["attention"], init_args["liger"]) == (
        True, "flash_attention_2", True)
