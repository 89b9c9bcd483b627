"""BatchPlanner: with 2 CPU ranks and a device memory given as a number, the chosen micro-batch trains under the limit
and the next larger one is predicted not to fit; the same decision on every rank; bad input.

The 2-rank run is the ZeRO-1 launch of ``scripts/monitor_run.py`` shared with test_memory_monitor.py.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from accuracy_targets import WORST_PCT, scratch_allowance, within_claim
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from monitor_launch import PLAN, launch, plan_settings, planner_args
from tiny_llm import ByteWindows, CausalLM, TextDataModule

from lightning_memopt.lightning.callbacks.batch_planner import BatchPlanner
from lightning_memopt.planning import estimate_memory


@pytest.mark.distributed
@pytest.mark.slow  # one 2-process planned fit (23 s), shared with the next test
def test_two_ranks_plan_is_the_same_everywhere_and_the_next_micro_batch_does_not_fit(tmp_path_factory):
    args = planner_args()
    device_memory, tokens = int(args[args.index("--plan") + 1]), int(args[args.index("--global-tokens") + 1])
    ranks = launch(tmp_path_factory, *args)
    assert len(ranks) == 2
    plans = [rank["planner"] for rank in ranks]
    assert plans[0] == plans[1]  # rank zero's decision everywhere
    plan = plans[0]
    budget = int(device_memory * 0.9)
    assert plan["max_micro_batch_size"] == PLAN["micro_batch_size"]
    assert (plan["micro_batch_size"], plan["accumulate_grad_batches"]) == (PLAN["micro_batch_size"], 2)
    assert plan["achieved_global_batch_tokens"] >= tokens
    for rank in ranks:  # applied on every rank
        assert rank["batch_size"] == plan["micro_batch_size"]
        assert rank["accumulate_grad_batches"] == plan["accumulate_grad_batches"]
        assert rank["global_step"] > 0
    # the planner's decision agrees with estimate_memory (the same predictor: a consistency check, not an accuracy
    # one; the accuracy of the planned run is the next test's): the chosen micro-batch fits, the next larger one not
    settings = plan_settings()
    assert estimate_memory(**settings, micro_batch_size=plan["micro_batch_size"]).total <= budget
    assert estimate_memory(**settings, micro_batch_size=plan["micro_batch_size"] + 1).total > budget


@pytest.mark.distributed
@pytest.mark.slow  # the same 2-process planned fit
def test_two_ranks_plan_trains_under_the_limit(tmp_path_factory):
    args = planner_args()
    device_memory = int(args[args.index("--plan") + 1])
    ranks = launch(tmp_path_factory, *args)
    history = ranks[0]["history"]  # every rank's, gathered on rank zero
    peaks = [row["actual_peak_bytes"] for row in history]
    assert len(peaks) == 2 * ranks[0]["global_step"]
    # the plan filled the budget (90 % of the device) with its prediction: the run stays under the budget up to the
    # claimed accuracy (over 1 %: no more; before, only the device memory bounded it, which let ~11 % pass)
    budget = int(device_memory * 0.9)
    limit = budget * (1 + WORST_PCT / 100) + scratch_allowance("bf16-mixed")
    assert max(peaks[2:]) <= limit, f"measured peaks {peaks}, budget {budget}"
    outside = [h for h in history if h["step"] >= 2
               and not within_claim(h["predicted_peak_bytes"], h["actual_peak_bytes"], "bf16-mixed")]
    assert not outside, outside


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"global_batch_tokens": 0, "device_memory": "1GiB"}, ValueError, "global_batch_tokens"),
        ({"global_batch_tokens": 1.5, "device_memory": "1GiB"}, ValueError, "global_batch_tokens"),
        ({"global_batch_tokens": 1024, "device_memory": "a lot"}, ValueError, "device_memory"),
        ({"global_batch_tokens": 1024, "device_memory": "1GiB", "margin": 1.5}, ValueError, "margin"),
        ({"global_batch_tokens": 1024, "device_memory": "1GiB", "seq_len": 0}, ValueError, "seq_len"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        BatchPlanner(**kwargs)


def _trainer(tmp_path, planner: BatchPlanner, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=CSVLogger(tmp_path), callbacks=[planner],
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      **kwargs)  # fmt: skip


def test_without_a_batch_size_attribute_setup_raises(tmp_path):
    loader = DataLoader(ByteWindows(seq_len=16), batch_size=2)
    with pytest.raises(MisconfigurationException, match="batch_size"):
        _trainer(tmp_path, BatchPlanner(1024, "1GiB")).fit(CausalLM(hidden_size=32, num_layers=1), loader)


def test_with_accumulate_grad_batches_already_set_setup_raises(tmp_path):
    trainer = _trainer(tmp_path, BatchPlanner(1024, "1GiB"), accumulate_grad_batches=4)
    with pytest.raises(MisconfigurationException, match="accumulate_grad_batches"):
        trainer.fit(CausalLM(hidden_size=32, num_layers=1), TextDataModule(batch_size=2, seq_len=16))


def test_single_process_sets_the_datamodule_batch_size_and_accumulation(tmp_path):
    data = TextDataModule(batch_size=1, seq_len=16)
    planner = BatchPlanner(
        global_batch_tokens=16 * 12, device_memory="1GiB"
    )  # plenty: no accumulation needed
    trainer = _trainer(tmp_path, planner)
    trainer.fit(CausalLM(hidden_size=32, num_layers=1), data)
    assert (data.batch_size, trainer.accumulate_grad_batches) == (12, 1)
    assert planner.result["max_micro_batch_size"] == 12 and planner.result["seq_len"] == 16
