"""Planner: largest micro-batch by binary search, accumulation for the global batch, cost order."""

import math

import pytest

from lightning_memopt.core.units import GiB
from lightning_memopt.planning import estimate_memory
from lightning_memopt.planning.plan import NoFitError, Plan, Setting, plan_batch

MODEL = "llama-3-8b"
BASE = dict(world_size=8, seq_len=4096, precision="bf16-mixed")


def _total(micro, setting, tokens=None, **kw):
    """The predicted peak at ``micro``, with the accumulation a global batch of ``tokens`` needs at it."""
    if tokens is not None:
        kw["accumulate_grad_batches"] = math.ceil(tokens / (micro * BASE["seq_len"] * BASE["world_size"]))
    return estimate_memory(MODEL, micro_batch_size=micro, **{**BASE, **kw}, **setting.kwargs("cpu")).total


def test_plan_finds_the_largest_micro_batch_and_enough_accumulation():
    plan = plan_batch(MODEL, device_memory="80GiB", global_batch_tokens=4_000_000, **BASE)
    assert isinstance(plan, Plan)
    budget = int(80 * GiB * 0.9)
    assert plan.budget == budget and plan.estimate.total <= budget
    largest = plan.max_micro_batch_size
    assert _total(largest, plan.setting, tokens=4_000_000) <= budget
    cap = math.ceil(4_000_000 / (4096 * 8))
    assert largest == cap or _total(largest + 1, plan.setting, tokens=4_000_000) > budget
    tokens = plan.micro_batch_size * 4096 * 8
    assert plan.achieved_global_batch_tokens == tokens * plan.accumulate_grad_batches >= 4_000_000
    assert (plan.accumulate_grad_batches - 1) * largest * 4096 * 8 < 4_000_000  # no needless accumulation steps
    assert plan.micro_batch_size <= largest
    assert plan.estimate == estimate_memory(MODEL, micro_batch_size=plan.micro_batch_size, **BASE,
                                            accumulate_grad_batches=plan.accumulate_grad_batches,
                                            **plan.setting.kwargs("cpu"))


@pytest.mark.slow  # a full-size preset at every stage, seconds each: `make test-slow` (CI runs it)
def test_plan_takes_the_cheapest_setting_that_fits():
    # 8B with Adam: 16 bytes/param of model states at stage 0 cannot fit 40 GiB; sharding must be used
    plan = plan_batch(MODEL, device_memory="40GiB", global_batch_tokens=1_000_000, margin=0.1, **BASE)
    assert plan.setting.zero > 0
    order = [s.describe() for s in _order()]
    chosen = order.index(plan.setting.describe())
    assert [name for name, _ in plan.tried] == order[: chosen + 1]
    assert all(total > plan.budget for _, total in plan.tried[:-1])  # every cheaper setting was too large


def _order():
    from lightning_memopt.planning.plan import _settings

    return _settings((0, 1, 2, 3), True, True)


def test_cost_order_is_documented_order():
    names = [s.describe() for s in _order()]
    assert names[:4] == ["zero=0", "zero=1", "zero=2", "zero=3"]
    assert names[4] == "zero=0 + checkpointing"
    assert names.index("zero=1 + offload optimizer") > names.index("zero=3 + checkpointing")
    assert names[-1] == "zero=3 + checkpointing + offload optimizer + offload parameters"


@pytest.mark.slow  # a full-size preset at every stage, seconds each: `make test-slow` (CI runs it)
def test_no_fit_names_the_smallest_prediction():
    with pytest.raises(NoFitError, match=r"smallest prediction is zero=3 \+ checkpointing .* GiB per rank"):
        plan_batch("llama-3-70b", device_memory="8GiB", world_size=1, seq_len=8192, global_batch_tokens=1e6)


def test_plan_rejects_searched_arguments_and_bad_input():
    with pytest.raises(TypeError, match="searches zero"):
        plan_batch(MODEL, device_memory="80GiB", global_batch_tokens=1e6, zero=3, **BASE)
    with pytest.raises(ValueError, match="margin"):
        plan_batch(MODEL, device_memory="80GiB", global_batch_tokens=1e6, margin=1.0, **BASE)
    with pytest.raises(ValueError, match="global_batch_tokens"):
        plan_batch(MODEL, device_memory="80GiB", global_batch_tokens=0, **BASE)
    with pytest.raises(ValueError, match="zero_stages"):
        plan_batch(MODEL, device_memory="80GiB", global_batch_tokens=1e6, zero_stages=(4,), **BASE)


def test_plan_table_and_dict():
    plan = plan_batch(MODEL, device_memory="80GiB", global_batch_tokens=4e6, **BASE)
    table = plan.table()
    assert "accumulate_grad_batches" in table and plan.setting.describe() in table and "total (peak)" in table
    data = plan.to_dict()
    assert data["zero"] == plan.setting.zero and data["estimate"]["total"] == plan.estimate.total
    assert data["achieved_global_batch_tokens"] >= 4_000_000


def test_setting_kwargs_round_trip():
    assert Setting(3, True, True, True).kwargs("nvme") == {
        "zero": 3, "activation_checkpointing": True, "offload_optimizer": "nvme", "offload_parameters": "nvme"}
