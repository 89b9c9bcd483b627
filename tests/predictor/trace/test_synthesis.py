import pytest
import torch
from predictor._modules import tiny_config
from torch import nn

from lightning_memopt.core.blocks import auto_blocks
from lightning_memopt.predictor.precision import resolve_precision
from lightning_memopt.predictor.read.sources import resolve_source
from lightning_memopt.predictor.trace import timeline as timeline_module
from lightning_memopt.predictor.trace.batch import synthetic_batch
from lightning_memopt.predictor.trace.synthesis import choose_run
from lightning_memopt.predictor.trace.timeline import trace_timeline
from lightning_memopt.predictor.trace.zero3 import Zero3Settings

SETTINGS = {
    "deepspeed bf16": dict(precision="bf16-mixed", engine="deepspeed"),
    "torch autocast, checkpointing": dict(precision="bf16-mixed", engine="torch", activation_checkpointing=True),
    "fp32 eager, half checkpointed": dict(precision="32-true", engine="torch", activation_checkpointing=0.5,
                                          attention="eager"),
    "zero3": dict(precision="bf16-mixed", engine="deepspeed", zero3=True),
}


def _both(config: "dict | nn.Module", settings: dict, monkeypatch: pytest.MonkeyPatch, batch=None):
    """The timeline traced at reduced depth and written out, and the full trace (synthesis switched off)."""
    module = resolve_source(config).module if isinstance(config, dict) else config
    if batch is None:
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


@pytest.mark.parametrize(
    ("model_type", "setting", "micro_batch"),
    [("llama", "torch autocast, checkpointing", 2), ("gemma3_text", "fp32 eager, half checkpointed", 2),
     ("qwen3_moe", "torch autocast, checkpointing", 2), ("vit", "fp32 eager, half checkpointed", 2),
     ("vit", "torch autocast, checkpointing", 1)],
)  # fmt: skip
def test_a_reduced_depth_trace_writes_out_the_storages_the_allocator_replays(model_type, setting, micro_batch,
                                                                             monkeypatch):  # fmt: skip
    """The storages of a reduced-depth trace written out at full depth (``record=True``) replay through the caching
    allocator as the full trace's do: the same ``max_memory_allocated`` and ``max_memory_reserved`` on an H100, and
    the same gradients kept for the optimizer (ViT at micro-batch 1: the position embedding's gradient is the
    storage the first block returns, ``sum_to_size`` of a batch of one being the tensor itself). A CUDA prediction
    of a deep model then traces it once, at reduced depth."""
    from collections import Counter

    from lightning_memopt.predictor.account.cuda_allocator import simulate
    from lightning_memopt.predictor.account.cuda_replay import allocator_settings, run_events
    from lightning_memopt.predictor.device import cuda_rules

    config = tiny_config(model_type, layers=9)
    module = resolve_source(config).module
    batch = synthetic_batch(module, micro_batch, None if model_type == "vit" else 24)
    settings = {**SETTINGS[setting], "cuda": True, "record": True}
    synthesized, full = _both(module, settings, monkeypatch, batch=batch)
    assert synthesized.details["traced_blocks"] < synthesized.details["blocks"], synthesized.details
    written, traced = synthesized.recorded, full.recorded
    assert written is not None and traced is not None and written.live == traced.live
    assert Counter(r[:3] for r in written.storages) == Counter(r[:3] for r in traced.storages)
    gradients = [Counter(t.storages[i][:3] for i in t.gradient_records()) for t in (written, traced)]
    assert gradients[0] == gradients[1] and gradients[0]
    rules = cuda_rules("NVIDIA H100")
    results = [simulate(run_events(t, [4096] * 7, [True] * 7, [], "foreach", 2, rules), allocator_settings(rules))
               for t in (written, traced)]  # fmt: skip
    assert (results[0].peak_allocated, results[0].peak_reserved) == (results[1].peak_allocated,
                                                                       results[1].peak_reserved)  # fmt: skip


def test_deepspeed_replays_a_full_depth_trace_in_the_engine_order():
    """DeepSpeed's replay reads the gradients in the order the engine receives them, which only a full-depth trace
    has: a reduced-depth trace asked with ``written_out=False`` records nothing, and a full one records its order."""
    module = resolve_source(tiny_config("llama", layers=9)).module
    batch = synthetic_batch(module, 2, 24)
    kwargs = dict(precision=resolve_precision("bf16-mixed"), engine="deepspeed", activation_checkpointing=False,
                  attention=None, zero3=False, cuda=True, record=True)  # fmt: skip
    assert trace_timeline(module, batch, written_out=False, **kwargs).recorded is None
    assert trace_timeline(module, batch, **kwargs).recorded.grad_order == ()  # written out: no order
    from lightning_memopt import estimate_memory

    est = estimate_memory(tiny_config("llama", layers=9), micro_batch_size=2, seq_len=24, zero=2, device="h100")
    assert est.reserved is not None and est.details["traced_blocks"] < est.details["blocks"]


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


def test_run_blocks_are_the_first_and_the_last_of_each_class_and_the_second_after_a_lists_start():
    """A class's first block that follows another block of its list stands for the later ones (its input is a
    block's output, as theirs is); the first block of a list does not, so its class runs its second too."""
    assert sorted(choose_run(["a"] * 80)) == [0, 1, 79]
    assert sorted(choose_run(["d", "d", "d"] + ["m"] * 58)) == [0, 1, 2, 3, 60]
    encoder_decoder = (["e"] * 6 + ["d"] * 6, ["encoder"] * 6 + ["decoder"] * 6)
    assert sorted(choose_run(*encoder_decoder)) == [0, 1, 5, 6, 7, 11]


#: DeepSpeed's coordinator scaled to the tiny models (a Llama block holds 36,864 elements): the reuse distance
#: (``stage3_max_reuse_distance``) spans about three blocks, the prefetch bucket most of one, and the live-parameter
#: cap four, so which parameters stay gathered is decided across blocks, on the whole module trace
ZERO3 = Zero3Settings(persistence_threshold=64, max_reuse_distance=100_000, prefetch_bucket_size=30_000,
                      max_live_parameters=150_000)  # fmt: skip
ZERO3_CASES = [  # (family, checkpointing): dense, MoE (fused experts, kept gathered by their saved views), both
    ("llama", False), ("llama", True), ("qwen3_moe", False), ("mixtral", True), ("deepseek_v3", False),
]  # fmt: skip


def _same(synthesized, full) -> None:
    assert synthesized.details["traced_blocks"] < synthesized.details["blocks"], synthesized.details
    assert (synthesized.live, synthesized.grads, synthesized.logits, synthesized.forward_end) == (
        full.live, full.grads, full.logits, full.forward_end,
    )  # fmt: skip
    assert synthesized.gathered == full.gathered


@pytest.mark.parametrize(("model_type", "checkpointing"), ZERO3_CASES)
def test_a_reduced_depth_trace_under_zero3_writes_out_deepspeeds_gathering(model_type, checkpointing, monkeypatch):
    """Under ZeRO-3 the parameters DeepSpeed holds gathered depend on the whole module trace (prefetch and reuse
    distance look ahead across blocks): the skipped blocks' fetch and release events are written out and the
    coordinator replayed on the full-depth sequence, which gives the full trace's timeline exactly, every op, every
    byte, gathered parameters included. The settings make the windows matter: more than a block is gathered at
    once, but never the whole model."""
    config = tiny_config(model_type, layers=10)
    settings = dict(precision="bf16-mixed", engine="deepspeed", zero3=ZERO3, activation_checkpointing=checkpointing)
    synthesized, full = _both(config, settings, monkeypatch)
    _same(synthesized, full)
    module = resolve_source(config).module
    block = 2 * max(sum(p.numel() for p in module.get_submodule(name).parameters()) for name in auto_blocks(module))
    assert block < max(full.gathered) < 2 * sum(p.numel() for p in module.parameters())


class _Encoder(nn.Module):
    """Ten ``nn.TransformerEncoderLayer`` s: ``nn.MultiheadAttention`` saves slices of its packed projection for
    backward, which keep that parameter gathered after DeepSpeed released it (pins)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True) for _ in range(10)
        )
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h).sum()


#: no reuse, no prefetch: each module's parameters are released right after its forward and its backward
RELEASE_EACH = Zero3Settings(64, max_reuse_distance=0, prefetch_bucket_size=0, max_live_parameters=10**9)


@pytest.mark.parametrize(("checkpointing", "zero3"), [(False, ZERO3), (True, RELEASE_EACH)])
def test_a_reduced_depth_trace_under_zero3_writes_out_the_views_that_keep_parameters_gathered(
    checkpointing, zero3, monkeypatch
):
    """Plain PyTorch blocks whose saved views keep a released parameter gathered (and, checkpointed, the weights
    their recomputation saves): those pins are written out with the events, and the timeline is the full trace's.
    (With these settings, leaving the skipped blocks' pins out changes the timeline.)"""
    torch.manual_seed(0)
    settings = dict(precision="32-true", engine="deepspeed", activation_checkpointing=checkpointing, zero3=zero3)
    _same(*_both(_Encoder(), settings, monkeypatch, batch=torch.randn(2, 12, 16)))
