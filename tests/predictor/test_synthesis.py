import pytest
from predictor._modules import tiny_config

from lightning_memopt.predictor import timeline as timeline_module
from lightning_memopt.predictor.precision import resolve_precision
from lightning_memopt.predictor.sources import resolve_source, synthetic_batch
from lightning_memopt.predictor.synthesis import choose_run
from lightning_memopt.predictor.timeline import trace_timeline

SETTINGS = {
    "deepspeed bf16": dict(precision="bf16-mixed", engine="deepspeed"),
    "torch autocast, checkpointing": dict(precision="bf16-mixed", engine="torch", activation_checkpointing=True),
    "fp32 eager, half checkpointed": dict(precision="32-true", engine="torch", activation_checkpointing=0.5,
                                          attention="eager"),
    "zero3": dict(precision="bf16-mixed", engine="deepspeed", zero3=True),
}


def _both(config: dict, settings: dict, monkeypatch: pytest.MonkeyPatch):
    module = resolve_source(config).module
    batch = synthetic_batch(module, 2, None if config["model_type"] == "vit" else 24)
    kwargs = {**dict(activation_checkpointing=False, attention=None, zero3=False), **settings}
    kwargs["precision"] = resolve_precision(kwargs["precision"])
    synthesized = trace_timeline(module, batch, **kwargs)
    monkeypatch.setattr(timeline_module, "SYNTHESIS_MIN_BLOCKS", 10**9)
    full = trace_timeline(module, batch, **kwargs)
    return synthesized, full


CASES = [  # every family once, every setting at least twice
    ("llama", "deepspeed bf16"), ("llama", "zero3"), ("gemma3_text", "fp32 eager, half checkpointed"),
    ("deepseek_v3", "torch autocast, checkpointing"), ("mixtral", "zero3"), ("gpt_neox", "deepspeed bf16"),
    ("qwen3_moe", "fp32 eager, half checkpointed"), ("vit", "torch autocast, checkpointing"),
]  # fmt: skip


@pytest.mark.parametrize(("model_type", "setting"), CASES)
def test_a_reduced_depth_trace_writes_out_the_full_trace_op_for_op(model_type, setting, monkeypatch):
    """Sliding-window patterns (Gemma 3: five local layers, then a global one), dense-then-MoE stacks (DeepSeek-V3),
    MoE stacks, a vision encoder: the synthesized timeline is the full trace's, every op, every byte."""
    synthesized, full = _both(tiny_config(model_type, layers=9), SETTINGS[setting], monkeypatch)
    assert synthesized.details["traced_blocks"] < synthesized.details["blocks"], synthesized.details
    assert (synthesized.live, synthesized.grads, synthesized.logits, synthesized.forward_end) == (
        full.live, full.grads, full.logits, full.forward_end,
    )  # fmt: skip


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_blocks_that_share_a_tensor_are_traced_in_full(model_type):
    """T5's first block computes the position bias every later block reuses; every decoder block of an
    encoder-decoder adds to the gradient of the encoder's output. Synthesis does not model such coupling, so every
    block is traced (exact, slower) and the details say why. (Comparing that trace with one traced with synthesis
    switched off compared the full trace with itself: it could not fail and is gone.)"""
    config = tiny_config(model_type, layers=8)
    module = resolve_source(config).module
    batch = synthetic_batch(module, 2, 24)
    traced = trace_timeline(module, batch, activation_checkpointing=False, attention=None, zero3=False,
                            precision=resolve_precision("bf16-mixed"), engine="deepspeed")  # fmt: skip
    assert "every block traced" in traced.details["synthesis"]
    assert traced.details["traced_blocks"] == traced.details["blocks"] == 2 * 8


def test_run_blocks_are_the_first_two_and_the_last_of_each_class():
    assert sorted(choose_run(["a"] * 80)) == [0, 1, 79]
    assert sorted(choose_run(["d", "d", "d"] + ["m"] * 58)) == [0, 1, 2, 3, 4, 60]
