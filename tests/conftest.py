"""Shared test setup: the examples and benchmarks folders on sys.path, GPU marker handling, process-group teardown."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.append(str(ROOT / "benchmarks"))  # accuracy_targets: the claimed accuracy, shared with the benchmarks
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["LIGHTNING_MEMOPT_CLI_CACHE"] = "off"  # the CLI's answer cache: tests that want it point it at tmp_path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked `gpu`); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _teardown_process_group():
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        _reset_deepspeed_groups()


def _reset_deepspeed_groups() -> None:
    """DeepSpeed caches the process groups it saw; drop them with the group, so the next test starts clean."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
            setattr(groups, name, None)
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None:
        comm.cdb = None


@pytest.fixture(autouse=True)
def _no_counting_allocator_left_installed(request):
    """The counting CPU allocator is process-wide: a test that leaves it installed changes what every later test
    measures. Fail the test that leaked it (and put the default allocator back)."""
    yield
    from lightning_memopt.measuring import cpu_allocator

    if cpu_allocator._LIB is not None and cpu_allocator.CPUAllocationCounter.installed():
        cpu_allocator._LIB.lmo_uninstall()
        pytest.fail(f"{request.node.nodeid} left the counting CPU allocator installed")
