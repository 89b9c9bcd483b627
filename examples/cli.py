"""LightningCLI entry point for config-driven runs (YAML):

    python examples/cli.py fit --config examples/configs/zero2.yaml
    python examples/cli.py fit --config examples/configs/zero3_offload.yaml --trainer.max_steps 20
"""

from lightning.pytorch.cli import LightningCLI
from tiny_llm import CausalLM, TextDataModule

import lightning_memopt  # noqa: F401  (registers the strategy names)


def main(args=None) -> LightningCLI:
    """Run the CLI; ``args`` (a list or dict) replaces the command line, as in ``LightningCLI(args=...)``."""
    return LightningCLI(CausalLM, TextDataModule, save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
