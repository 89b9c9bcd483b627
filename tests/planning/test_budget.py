"""Budget-driven checkpointing: the fewest blocks that fit, measured under the budget, and clear errors."""

import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transforms._models import hf_model

from lightning_memopt.measuring.memory import DeviceMemoryProbe, collect_garbage
from lightning_memopt.planning import CheckpointPlan, checkpoint_to_fit, estimate_memory
from lightning_memopt.transforms import applied_transforms, apply_activation_checkpointing, blocks_to_checkpoint

LAYERS, BATCH, SEQ = 8, 2, 256
RUN = {
    "engine": "torch",
    "precision": "32-true",
    "optimizer": "adamw",
    "micro_batch_size": BATCH,
    "seq_len": SEQ,
}


def _predicted(model, checkpointing, attention):
    return estimate_memory(model, activation_checkpointing=checkpointing, attention=attention, **RUN).total


def _measured_step_peak(build) -> int:
    """Peak live CPU bytes of building the model and one AdamW training step (counting allocator)."""
    collect_garbage()
    probe = DeviceMemoryProbe("cpu", cpu_mode="allocator")
    base = probe.current_bytes
    probe.start_step()
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    peak = probe.end_step().peak_bytes - base
    probe.close()
    return peak


@pytest.mark.slow  # a measured fit per budget (18 s)
def test_a_budget_between_the_extremes_wraps_a_strict_subset_and_the_measured_peak_fits():
    attention = "sdpa"  # eager is measured in docs/transforms.md (a step costs ~10x more on CPU)
    model = hf_model("llama", layers=LAYERS, attn=attention)
    none, full = _predicted(model, False, attention), _predicted(model, True, attention)
    budget = (none + full) // 2

    plan = checkpoint_to_fit(model, budget, **RUN)

    assert isinstance(plan, CheckpointPlan)
    assert 0 < plan.num_checkpointed < plan.num_blocks == LAYERS
    assert list(plan.blocks) == blocks_to_checkpoint(model)[: plan.num_checkpointed]
    assert (plan.peak_without_checkpointing, plan.peak_full_checkpointing, plan.budget) == (
        none,
        full,
        budget,
    )
    assert plan.predicted_peak == _predicted(model, plan.num_checkpointed, attention) <= budget
    assert _predicted(model, plan.num_checkpointed - 1, attention) > budget  # the fewest blocks
    applied = applied_transforms(model)
    assert applied["activation_checkpointing"]["blocks"] == list(plan.blocks)
    assert applied["checkpoint_plan"] == plan.to_dict()

    def build_planned():
        fresh = hf_model("llama", layers=LAYERS, attn=attention)
        checkpoint_to_fit(fresh, budget, **RUN)
        return fresh

    measured = _measured_step_peak(build_planned)
    without = _measured_step_peak(lambda: hf_model("llama", layers=LAYERS, attn=attention))
    assert measured <= budget < without, (measured, budget, without)


def test_no_block_when_the_budget_holds_all_and_every_block_at_the_full_peak():
    model = apply_activation_checkpointing(hf_model("llama", layers=4, attn="sdpa"))  # replaced by the plan
    none = _predicted(model, False, "sdpa")
    plan = checkpoint_to_fit(model, none, **RUN)
    assert (plan.num_checkpointed, plan.blocks, plan.predicted_peak) == (0, (), none)
    assert "activation_checkpointing" not in applied_transforms(model)
    assert applied_transforms(model)["checkpoint_plan"]["num_checkpointed"] == 0
    assert all("forward" not in block.__dict__ for block in model.model.layers)

    full = _predicted(model, True, "sdpa")
    plan = checkpoint_to_fit(model, f"{full}B", **RUN)
    assert plan.num_checkpointed == 4 and plan.fits
    assert applied_transforms(model)["activation_checkpointing"]["fraction"] == 1.0


def test_attention_is_read_from_the_model_when_not_given():
    model = hf_model("llama", layers=4, attn="eager")
    plan = checkpoint_to_fit(model, "1TiB", **RUN)
    assert plan.peak_without_checkpointing == _predicted(model, False, "eager")


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ("lots", "Expected the memory budget as bytes or a size like '24GiB'"),
        (0, "Expected a positive memory budget"),
        (True, "Expected the memory budget as bytes"),
    ],
)
def test_an_unparsable_budget_raises(budget, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        checkpoint_to_fit(hf_model("llama", layers=2, attn="sdpa"), budget, **RUN)


def test_a_budget_below_the_full_checkpointing_peak_raises_with_that_peak():
    model = hf_model("llama", layers=4, attn="sdpa")
    full = _predicted(model, True, "sdpa")
    with pytest.raises(
        ValueError, match=r"at least the predicted peak with all 4 blocks .* checkpointed \("
    ) as err:
        checkpoint_to_fit(model, full - 1, **RUN)
    assert f"{full / 2**20:.2f} MiB" in str(err.value) and "Fix:" in str(err.value)
    assert "checkpoint_plan" not in applied_transforms(model)


def test_the_search_settings_are_not_accepted_as_predictor_arguments():
    with pytest.raises(TypeError, match="without \\['model', 'activation_checkpointing'\\]"):
        checkpoint_to_fit(
            hf_model("llama", layers=2, attn="sdpa"), "1GiB", activation_checkpointing=True, **RUN
        )


# ------------------------------------------------------------------------------------------ Lightning glue
class _MeasureStep(pl.Callback):
    """The peak live CPU bytes of the first training step, the run's own storages only."""

    def setup(self, trainer, pl_module, stage):
        collect_garbage()
        self.probe = DeviceMemoryProbe("cpu", cpu_mode="allocator")
        self.probe.track(pl_module)
        own = sum(t.untyped_storage().nbytes() for t in pl_module.state_dict().values())
        self.foreign = self.probe.current_bytes - own

    def on_train_batch_start(self, *args):
        self.probe.start_step()

    def on_train_batch_end(self, *args):
        self.peak = self.probe.end_step().peak_bytes - self.foreign
        self.probe.close()


def _trainer(strategy, callbacks=(), tmp_path=None):
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision="32-true",
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
    )


def _fit(trainer):
    from tiny_llm import CausalLM, TextDataModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(CausalLM(num_layers=LAYERS), TextDataModule(batch_size=BATCH, seq_len=SEQ))


def test_memopt_strategy_budget_checkpoints_a_strict_subset_and_the_measured_peak_fits(tmp_path):
    from lightning_memopt import MemOptStrategy

    budget = 16 * 2**20  # between the predicted 24.0 MiB without and 9.1 MiB with full checkpointing (ZeRO-1)
    measure = _MeasureStep()
    trainer = _trainer(
        MemOptStrategy(zero=1, activation_checkpointing="budget", memory_budget="16MiB"), [measure], tmp_path
    )
    _fit(trainer)
    plan = applied_transforms(trainer.lightning_module)["checkpoint_plan"]
    assert 0 < plan["num_checkpointed"] < plan["num_blocks"] == LAYERS
    assert plan["peak_full_checkpointing"] < budget < plan["peak_without_checkpointing"]
    assert plan["predicted_peak"] <= budget == plan["budget"]
    assert measure.peak <= budget, (measure.peak, budget)


def test_callback_budget_plans_under_a_plain_strategy(tmp_path):
    from lightning_memopt.lightning.callbacks.transforms import ActivationCheckpointing

    callback = ActivationCheckpointing(budget="16MiB")
    trainer = _trainer("auto", [callback], tmp_path)
    _fit(trainer)
    assert 0 < callback.plan.num_checkpointed < LAYERS
    assert applied_transforms(trainer.lightning_module)["checkpoint_plan"] == callback.plan.to_dict()


def test_budget_without_memory_budget_on_cpu_raises_at_setup(tmp_path):
    from lightning_memopt import MemOptStrategy
    from lightning_memopt.lightning.callbacks.transforms import ActivationCheckpointing

    with pytest.raises(
        MisconfigurationException, match="Expected an explicit memory budget .* on a 'cpu' device"
    ):
        _fit(_trainer(MemOptStrategy(zero=1, activation_checkpointing="budget"), tmp_path=tmp_path))
    with pytest.raises(MisconfigurationException, match="Expected an explicit memory budget"):
        _fit(_trainer("auto", [ActivationCheckpointing(budget="device")], tmp_path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"activation_checkpointing": "budget", "memory_budget": "lots"},
            "Expected the memory budget as bytes",
        ),
        ({"activation_checkpointing": True, "memory_budget": "8GiB"}, "Expected `memory_budget` only with"),
        ({"activation_checkpointing": "yes"}, "Expected `activation_checkpointing` to be a bool, a fraction"),
    ],
)
def test_bad_budget_options_raise_at_construction(kwargs, message):
    from lightning_memopt import MemOptStrategy

    with pytest.raises(ValueError, match=re.escape(message)):
        MemOptStrategy(**kwargs)


def test_bad_callback_budget_raises_at_construction():
    from lightning_memopt.lightning.callbacks.transforms import ActivationCheckpointing

    with pytest.raises(ValueError, match="Expected either `budget` or `fraction`/`every_k`"):
        ActivationCheckpointing(fraction=0.5, budget="8GiB")
    with pytest.raises(ValueError, match="Expected the memory budget as bytes"):
        ActivationCheckpointing(budget="8 apples")


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the default budget is its memory)"
)
def test_device_budget_is_the_cuda_memory_less_the_margin(tmp_path):
    from lightning_memopt.lightning.callbacks.transforms import ActivationCheckpointing
    from lightning_memopt.lightning.strategies.transforms import DEVICE_MARGIN

    callback = ActivationCheckpointing(budget="device")
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[callback],
        default_root_dir=tmp_path,
    )
    _fit(trainer)
    total = torch.cuda.get_device_properties(trainer.strategy.root_device).total_memory
    assert callback.plan.budget == int(total * (1 - DEVICE_MARGIN))
    assert callback.plan.num_checkpointed == 0  # a tiny model fits without checkpointing


def _table() -> None:  # pragma: no cover - docs table: see docs/transforms.md
    """The budget table of docs/transforms.md (MemOptStrategy ZeRO-1, CPU, one process, fp32).

    Run: ``PYTHONPATH=tests:examples python tests/transforms/test_budget.py``.
    """
    import logging

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    from tiny_llm import CausalLM, TextDataModule

    from lightning_memopt import MemOptStrategy

    mib = 2**20
    print(
        f"CausalLM llama, {LAYERS} blocks, hidden 64, batch {BATCH} x seq {SEQ}, fp32, ZeRO-1, 1 CPU process"
    )
    print("| attention | budget | blocks wrapped | predicted peak | measured peak | measured / budget |")
    print("|---|---|---|---|---|---|")
    for attention, budgets in (("sdpa", (32, 20, 16, 12, 9.5, 8)), ("eager", (48, 32, 24, 16, 12, 8))):
        for budget in budgets:
            measure = _MeasureStep()
            strategy = MemOptStrategy(zero=1, activation_checkpointing="budget", memory_budget=f"{budget}MiB")
            trainer = _trainer(strategy, [measure])
            try:
                trainer.fit(
                    CausalLM(num_layers=LAYERS, attn_implementation=attention),
                    TextDataModule(batch_size=BATCH, seq_len=SEQ),
                )
            except ValueError as err:
                print(f"| {attention} | {budget} MiB | error: {str(err).split('. Fix')[0]} | | | |")
                continue
            plan = applied_transforms(trainer.lightning_module)["checkpoint_plan"]
            print(
                f"| {attention} | {budget} MiB | {plan['num_checkpointed']} of {plan['num_blocks']} | "
                f"{plan['predicted_peak'] / mib:.2f} MiB | {measure.peak / mib:.2f} MiB | "
                f"{measure.peak / plan['budget']:.2f} |"
            )


if __name__ == "__main__":
    _table()
