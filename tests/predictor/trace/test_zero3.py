"""The ZeRO-3 gathering replay (:mod:`lightning_memopt.predictor.trace.zero3`): which parameters DeepSpeed 0.19.8 holds
gathered at every op of a traced step. The benchmark (``benchmarks/predictor_accuracy.py --stages 3``) compares the
whole prediction with real MemOptStrategy runs; these tests pin the coordinator's rules one by one."""

import pytest
import torch
from torch import nn

from lightning_memopt.predictor.precision import resolve_precision
from lightning_memopt.predictor.trace.step import trace_step
from lightning_memopt.predictor.trace.zero3 import Zero3Settings

FP32 = resolve_precision("32-true")


def _settings(complete: bool = True, reuse: int = 10**9, threshold: int = 0) -> Zero3Settings:
    return Zero3Settings(persistence_threshold=threshold, max_reuse_distance=reuse, prefetch_bucket_size=0,
                         max_live_parameters=10**9, complete_trace=complete)  # fmt: skip


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))


def _bytes(*modules: nn.Module) -> int:
    return sum(4 * p.numel() for m in modules for p in m.parameters())


def _trace(model: nn.Module, settings: Zero3Settings, **kw):
    res = trace_step(model, torch.zeros(4, 32), FP32, zero3=settings, step=lambda m, b: m(b).sum(), **kw)
    return res, res.gathered[: res.forward_end + 1], res.gathered[res.forward_end + 1 :]


@pytest.mark.parametrize(("complete", "reuse"), [(False, 10**9), (True, 0)])
def test_each_module_is_released_after_its_forward_and_its_backward(complete, reuse):
    """Without a complete module trace (the step calls the model itself, which restarts DeepSpeed's trace) or with
    ``stage3_max_reuse_distance=0``, a module's parameters are gathered for its forward and again for its backward
    only: never more than the largest module at once, nothing at the end of forward or backward."""
    net = _mlp()
    res, forward, backward = _trace(net, _settings(complete, reuse))
    largest = max(_bytes(m) for m in net)
    assert max(forward) == max(backward) == largest
    assert forward[-1] == 0 and res.gathered[-1] == 0
    assert all(live >= g for live, g in zip(res.live, res.gathered))  # the gathered bytes are in the live ones


def test_parameters_used_again_within_the_reuse_distance_stay_gathered_into_backward():
    """A complete trace and a large ``stage3_max_reuse_distance``: every module is used again by its backward
    within the distance, so nothing is released in forward; backward releases module after module."""
    net = _mlp()
    res, forward, backward = _trace(net, _settings(complete=True))
    assert forward[-1] == max(res.gathered) == _bytes(net)
    assert sorted(set(backward), reverse=True) == [_bytes(net), _bytes(net[0], net[2]), _bytes(net[0]), 0]


def test_a_frozen_prefix_is_released_after_its_forward():
    """A frozen first layer whose input needs no gradient gets no backward (DeepSpeed's pre-backward hook never
    fires for it): it is not reused, so it is released after its forward even with a complete trace."""
    net = _mlp()
    net[0].requires_grad_(False)
    res, forward, backward = _trace(net, _settings(complete=True))
    assert max(forward) == forward[-1] == max(backward) == _bytes(net[2], net[4])
    assert res.gathered[-1] == 0


def test_persistent_parameters_are_never_gathered():
    """Parameters at or below ``stage3_param_persistence_threshold`` are whole on every rank (model states)."""
    net = _mlp()
    res, _, _ = _trace(net, _settings(complete=False, threshold=64))  # the biases
    assert max(res.gathered) == max(4 * m.weight.numel() for m in net[::2])


def test_a_recomputed_block_holds_two_copies_of_a_weight_during_its_backward():
    """Activation checkpointing: the recomputed forward saves ``weight.detach()`` (torch.utils.checkpoint), which
    keeps the gathered storage after DeepSpeed released the parameter, while the module's backward gathers it anew
    (measured through MemOptStrategy on the plain model: -4.2 % before this was modelled, -0.5 % after).

    This proves the mechanism only (both copies are live at once), hence a bound: what else is gathered at that
    moment depends on the prefetch schedule. The value is judged where it can be measured, by the quick accuracy
    subset's ZeRO-3 fp32 configuration of this model with checkpointing, against the counting allocator
    (`-m slow tests/benchmarks/test_predictor_accuracy.py`)."""
    from plain_transformer import PlainLM

    torch.manual_seed(0)
    model = PlainLM(hidden=32, layers=2, attention="sdpa")
    ids = torch.randint(0, 256, (2, 16))
    settings = _settings(complete=False)
    res = trace_step(model, ids, FP32, zero3=settings, activation_checkpointing=True)
    backward = res.gathered[res.forward_end + 1 :]
    fc1 = _bytes(model.blocks[0].mlp[0])
    assert max(backward) >= 2 * fc1
    assert res.gathered[-1] == 0
