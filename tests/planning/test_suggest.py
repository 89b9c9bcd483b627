"""Fixes for a run that does not fit: real predictions, ranked cheapest first."""

import pytest

from lightning_memopt.core.units import GiB
from lightning_memopt.planning import estimate_memory
from lightning_memopt.planning.suggest import suggest_fixes

MODEL = "llama-3-8b"
BASE = dict(world_size=8, seq_len=4096, precision="bf16-mixed")
#: the fixes include ZeRO-3, which traces every block of the 8B preset at 4096 tokens: `make test-slow` (CI runs it)
pytestmark = pytest.mark.slow


def test_suggest_fixes_ranks_fitting_changes_first_with_real_predictions():
    kwargs = dict(model=MODEL, micro_batch_size=16, **BASE)
    current = estimate_memory(**kwargs).total
    fixes = suggest_fixes(kwargs, "80GiB", margin=0.1)
    assert fixes and fixes[0].fits
    fits = [f.fits for f in fixes]
    assert fits == sorted(fits, reverse=True)  # fitting suggestions first
    for fix in fixes:
        assert fix.predicted_total < current
        change = {k: v for k, v in fix.kwargs_change.items() if k != "accumulate_grad_batches_factor"}
        assert fix.predicted_total == estimate_memory(**{**kwargs, **change}).total
        assert fix.fits == (fix.predicted_total <= int(80 * GiB * 0.9))


def test_suggest_fixes_micro_batch_keeps_the_global_batch():
    kwargs = dict(model=MODEL, micro_batch_size=512, zero=3, activation_checkpointing=False, **BASE)
    fixes = suggest_fixes(kwargs, "80GiB", max_suggestions=20)
    micro = [f for f in fixes if "micro_batch_size" in f.kwargs_change]
    assert micro, [str(f) for f in fixes]
    change = micro[0].kwargs_change
    assert change["micro_batch_size"] * change["accumulate_grad_batches_factor"] >= 512
    assert micro[0].description.startswith("micro-batch 512 -> ")


def test_suggest_fixes_micro_batch_ranks_after_zero_and_before_checkpointing():
    kwargs = dict(model=MODEL, micro_batch_size=16, zero=2, **BASE)
    fixes = suggest_fixes(kwargs, "200GiB", margin=0.1, max_suggestions=20, cuda=False)
    described = [f.description for f in fixes if f.fits]
    micro = next(i for i, d in enumerate(described) if d.startswith("micro-batch"))
    zero = [i for i, d in enumerate(described) if d.startswith("zero=")]
    ckpt = [i for i, d in enumerate(described) if d == "+ activation checkpointing"]
    assert all(i < micro for i in zero) and all(micro < i for i in ckpt), described
    fix = fixes[[f.description for f in fixes].index(described[micro])]
    assert fix.kwargs_change["accumulate_grad_batches"] == fix.kwargs_change["accumulate_grad_batches_factor"]
    change = {k: v for k, v in fix.kwargs_change.items() if k != "accumulate_grad_batches_factor"}
    assert fix.predicted_total == estimate_memory(**{**kwargs, **change}).total


def test_suggest_fixes_offers_liger_only_on_cuda():
    kwargs = dict(model=MODEL, micro_batch_size=16, **BASE)
    on_cpu = suggest_fixes(kwargs, "80GiB", max_suggestions=20, cuda=False)
    on_gpu = suggest_fixes(kwargs, "80GiB", max_suggestions=20, cuda=True)
    assert not any(f.kwargs_change.get("liger") for f in on_cpu)
    assert any(f.kwargs_change.get("liger") for f in on_gpu)


def test_suggest_fixes_accepts_a_deepspeed_config_that_sets_the_stage():
    config = {"zero_optimization": {"stage": 1, "reduce_bucket_size": 10**7, "offload_optimizer": {"device": "none"}}}
    kwargs = dict(model=MODEL, micro_batch_size=16, zero=1, deepspeed_config=config, **BASE)
    fixes = suggest_fixes(kwargs, "80GiB", max_suggestions=20)
    stages = {f.kwargs_change["zero"] for f in fixes if "zero" in f.kwargs_change}
    assert stages and stages <= {2, 3}
    buckets = {"zero_optimization": {"reduce_bucket_size": 10**7}}  # the config without stage and offload
    for fix in fixes:
        if set(fix.kwargs_change) == {"zero"}:
            expected = estimate_memory(**{**kwargs, "deepspeed_config": buckets, **fix.kwargs_change}).total
            assert fix.predicted_total == expected
    assert config["zero_optimization"]["stage"] == 1  # the caller's config is left alone


def test_suggest_fixes_for_plain_torch_switches_to_memopt_strategy():
    kwargs = dict(model=MODEL, micro_batch_size=4, engine="torch", **BASE)
    zero_config = {"zero_optimization": {"reduce_bucket_size": 4096 * 4096}}
    fixes = suggest_fixes(kwargs, "80GiB", max_suggestions=20, zero_config=zero_config)
    switches = [f for f in fixes if "zero" in f.kwargs_change]
    assert switches and all("switch to MemOptStrategy(zero=" in f.description for f in switches)
    for fix in switches:
        assert fix.kwargs_change["engine"] == "deepspeed"
        assert fix.predicted_total == estimate_memory(**{**kwargs, **fix.kwargs_change}).total
