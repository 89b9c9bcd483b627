"""The package root: lazy public names, and the strategy names Lightning resolves after a bare import."""

import subprocess
import sys

import pytest

import lightning_memopt


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return out.stdout.strip()


def test_bare_import_loads_neither_torch_nor_lightning() -> None:
    code = "import sys, lightning_memopt; print(sorted({'torch', 'lightning', 'deepspeed'} & set(sys.modules)))"
    assert _run(code) == "[]"


def test_every_public_name_resolves() -> None:
    assert sorted(lightning_memopt.__all__) == sorted(lightning_memopt._EXPORTS)
    for name in lightning_memopt.__all__:
        assert getattr(lightning_memopt, name).__name__ == name
    assert set(lightning_memopt.__all__) <= set(dir(lightning_memopt))


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lightning_memopt.nope  # noqa: B018


@pytest.mark.parametrize("order", ["memopt_first", "lightning_first"])
def test_strategy_names_registered_after_bare_import(order: str) -> None:
    imports = (
        "import lightning_memopt; import lightning"
        if order == "memopt_first"
        else "import lightning; import lightning_memopt"
    )
    code = (
        f"{imports}\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "print(sorted(n for n in StrategyRegistry if n.startswith('memopt_')))\n"
        "trainer = lightning.Trainer(strategy='memopt_zero3', accelerator='cpu', devices=1, logger=False)\n"
        "print(type(trainer.strategy).__name__, trainer.strategy.zero_stage)"
    )
    lines = _run(code).splitlines()  # DeepSpeed prints its accelerator notice to stdout too
    names = next(line for line in lines if line.startswith("['memopt"))
    strategy = next(line for line in lines if line.startswith("MemOptStrategy"))
    assert names == str(["memopt_zero1", "memopt_zero2", "memopt_zero3", "memopt_zero3_offload"])
    assert strategy == "MemOptStrategy 3"  # the Trainer resolves the name to the strategy
