"""Tests for the CPU/CUDA memory measuring tools: known allocations must be counted exactly."""


import pytest
import torch
from torch import nn

from lightning_memopt.measuring.cpu_allocator import CPUAllocationCounter
from lightning_memopt.measuring.memory import (
    DeviceMemoryProbe,
    StepMemory,
    collect_garbage,
    dump_cuda_memory_snapshot,
    record_cuda_memory_history,
)
from lightning_memopt.measuring.tensor_tracker import TensorMemoryTracker
from lightning_memopt.measuring.tensor_walk import iter_tensors

MiB = 2**20


@pytest.fixture(params=["dispatch", "allocator"])
def probe(request: pytest.FixtureRequest):
    probe = DeviceMemoryProbe("cpu", cpu_mode=request.param)
    probe.start()
    yield probe
    probe.close()


def test_tensor_of_n_bytes_then_freed(probe: DeviceMemoryProbe) -> None:
    probe.start_step()
    base = probe.current_bytes
    x = torch.empty(MiB, dtype=torch.uint8)
    assert probe.current_bytes - base == MiB
    del x
    step = probe.end_step()
    assert step.current_bytes - base == 0
    assert step.peak_bytes - base == MiB


def test_views_and_inplace_ops_do_not_double_count(probe: DeviceMemoryProbe) -> None:
    probe.start_step()
    base = probe.current_bytes
    x = torch.zeros(256, 1024)  # 1 MiB fp32
    views = [x.view(-1), x[1:], x.t(), x.data, x.detach()]
    x.add_(1).mul_(2)
    assert probe.current_bytes - base == MiB
    del x, views
    assert probe.current_bytes - base == 0
    assert probe.end_step().peak_bytes - base == pytest.approx(MiB, abs=64)  # + wrapped scalars


def test_resize_through_an_op_is_measured(probe: DeviceMemoryProbe) -> None:
    base = probe.current_bytes
    x = torch.empty(1024, dtype=torch.uint8)
    x.resize_(4096)
    assert probe.current_bytes - base == 4096
    del x


def test_autograd_saved_tensors_and_gradients() -> None:
    tracker = TensorMemoryTracker("cpu")
    weight = nn.Parameter(torch.randn(512, 512))  # 1 MiB, created outside: registered
    assert tracker.track(weight) == MiB
    with tracker:
        x = torch.randn(512, 512)
        hidden = (x @ weight).relu()  # the matmul output dies once relu (which saves its result) ran
        assert tracker.current_bytes == 3 * MiB  # weight, x, hidden
        assert tracker.peak_bytes == 4 * MiB  # + the matmul output
        tracker.reset_peak()
        hidden.sum().backward()  # relu's grad (1 MiB) is alive while mm makes weight.grad (1 MiB)
    assert weight.grad is not None
    assert tracker.current_bytes == pytest.approx(4 * MiB, abs=64)  # + weight.grad; graph freed
    assert tracker.peak_bytes == pytest.approx(5 * MiB, abs=64)


def test_optimizer_states_created_in_step_are_counted(probe: DeviceMemoryProbe) -> None:
    model = nn.Linear(256, 256, bias=False)  # 256 KiB of weights
    optimizer = torch.optim.Adam(model.parameters())
    probe.track(model, optimizer)
    model(torch.randn(4, 256)).sum().backward()
    probe.start_step()
    base = probe.current_bytes
    optimizer.step()  # creates exp_avg and exp_avg_sq (2 x 256 KiB) and a step counter
    step = probe.end_step()
    assert step.current_bytes - base >= 2 * 256 * 1024
    assert step.current_bytes - base <= 2 * 256 * 1024 + 64


def test_tracking_preexisting_tensors_and_their_release(probe: DeviceMemoryProbe) -> None:
    probe.close()  # created while the dispatch tracker is inactive: only registration can count it
    model = nn.Linear(128, 128)
    probe.start()
    base = probe.current_bytes
    added = probe.track(model)
    expected = (128 * 128 + 128) * 4
    if probe.cpu_mode == "dispatch" or added:
        assert added == expected
        assert probe.track(model) == 0  # de-duplicated
        del model
        collect_garbage()
        assert probe.current_bytes == base
    else:  # the allocator counted it at creation already: registering adds nothing
        assert added == 0


def test_allocator_sees_allocations_in_other_threads() -> None:
    import threading

    counter = CPUAllocationCounter()
    base = counter.current_bytes
    box = []
    thread = threading.Thread(target=lambda: box.append(torch.empty(MiB, dtype=torch.uint8)))
    thread.start()
    thread.join()
    assert counter.current_bytes - base == MiB
    box.clear()
    assert counter.current_bytes - base == 0
    counter.close()


def test_allocator_is_removed_by_the_probe_that_installed_it() -> None:
    assert not CPUAllocationCounter.installed()  # opt-in: nothing installs it by default
    DeviceMemoryProbe("cpu").close()
    assert not CPUAllocationCounter.installed()
    probe = DeviceMemoryProbe("cpu", cpu_mode="allocator")
    assert CPUAllocationCounter.installed()
    kept = torch.empty(MiB, dtype=torch.uint8)  # counted, and taken off the count when freed after removal
    base = probe.current_bytes
    probe.close()
    assert not CPUAllocationCounter.installed()
    x = torch.empty(MiB, dtype=torch.uint8)  # no longer counted
    assert probe.current_bytes == base
    del kept, x
    assert probe.current_bytes == base - MiB


def test_modes_agree_on_a_training_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    optimizer = torch.optim.AdamW(model.parameters())
    batch = torch.randn(32, 64)
    model(batch).pow(2).mean().backward()
    optimizer.step()  # Adam states exist before both measured steps
    optimizer.zero_grad()
    peaks = {}
    for mode in ("dispatch", "allocator"):
        probe = DeviceMemoryProbe("cpu", cpu_mode=mode)
        probe.track(model, optimizer)
        probe.start_step()
        base = probe.current_bytes
        model(batch).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        step = probe.end_step()
        probe.close()
        peaks[mode] = step.peak_bytes - base
    # kernels may allocate workspaces that only the allocator sees; the live tensors are the same
    assert peaks["allocator"] >= peaks["dispatch"] > 0
    assert peaks["allocator"] <= 1.05 * peaks["dispatch"]


def test_iter_tensors_finds_nested_buffers() -> None:
    class Wrapper:  # like a DeepSpeed ZeRO optimizer: flat buffers in plain attributes
        def __init__(self) -> None:
            self.flat = [torch.zeros(3)]
            self.groups = {"fp32": (torch.zeros(4),)}

    found = sorted(t.numel() for t in iter_tensors(Wrapper()))
    assert found == [3, 4]


def test_step_memory_fields_on_cpu() -> None:
    probe = DeviceMemoryProbe("cpu")
    probe.start_step()
    step = probe.end_step()
    assert isinstance(step, StepMemory)
    assert step.reserved_bytes is None
    assert 0 < step.rss_bytes < step.device_total
    assert 0 < step.device_free <= step.device_total
    assert set(step.to_dict()) == {"peak_bytes", "current_bytes", "reserved_bytes", "device_total",
                                   "device_free", "rss_bytes"}  # fmt: skip


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"device": "meta"}, "Expected a 'cpu' or 'cuda' device"),
    ({"device": "cpu", "cpu_mode": "profiler"}, "Expected cpu_mode in"),
    ({"device": "cpu", "cuda_mode": "allocators"}, "Expected cuda_mode in"),
])  # fmt: skip
def test_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DeviceMemoryProbe(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_raises() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        DeviceMemoryProbe("cuda")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        record_cuda_memory_history()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_dispatch_mode_leaves_the_allocator_peaks_alone() -> None:
    probe = DeviceMemoryProbe("cuda")  # dispatch: counts the op outputs itself
    probe.start()
    x = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")
    del x
    peak = torch.cuda.max_memory_allocated()
    probe.start_step()
    base = probe.current_bytes
    y = torch.ones(8 * MiB, dtype=torch.uint8, device="cuda") + 1  # two 8 MiB storages at once
    del y
    step = probe.end_step()
    probe.close()
    assert torch.cuda.max_memory_allocated() == peak  # not reset: DeviceStatsMonitor's peak keys stay the run's
    assert step.peak_bytes - base == 16 * MiB and step.current_bytes == base


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_and_snapshot(tmp_path) -> None:
    probe = DeviceMemoryProbe("cuda", cuda_mode="allocator")
    record_cuda_memory_history(True)
    probe.start_step()
    base = probe.current_bytes
    x = torch.empty(8 * MiB, dtype=torch.uint8, device="cuda")
    del x
    step = probe.end_step()
    assert step.peak_bytes - base >= 8 * MiB
    assert step.reserved_bytes is not None and step.reserved_bytes >= step.peak_bytes
    assert 0 < step.device_free <= step.device_total
    path = dump_cuda_memory_snapshot(tmp_path / "snapshot.pickle")
    record_cuda_memory_history(False)
    assert path.stat().st_size > 0
