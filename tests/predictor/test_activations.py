import pytest
import torch

from lightning_memopt.predictor.activations import activation_bytes, num_checkpointed
from lightning_memopt.predictor.model_spec import resolve_model
from plain_transformer import PlainLM
from transforms._models import hf_model


_CASES = [  # (family, attention, precision, checkpointing, engine, micro-batch, sequence)
    ("llama", "sdpa", "bf16-mixed", False, "deepspeed", 2, 48),
    ("llama", "eager", "32-true", False, "deepspeed", 2, 48),
    ("qwen2", "eager", "bf16-mixed", False, "deepspeed", 2, 48),
    ("qwen2", "sdpa", "32-true", True, "deepspeed", 2, 48),
    ("llama", "eager", "bf16-mixed", True, "deepspeed", 2, 48),
    ("llama", "sdpa", "bf16-mixed", True, "deepspeed", 2, 48),
    ("llama", "eager", "bf16-mixed", False, "deepspeed", 1, 384),  # s x s terms: the softmax backward peaks
    ("qwen2", "eager", "32-true", True, "deepspeed", 1, 384),  # and the recomputed block's forward softmax
    ("llama", "sdpa", "bf16-mixed", False, "torch", 4, 64),
    ("qwen2", "sdpa", "bf16-mixed", True, "torch", 4, 64),
    ("llama", "eager", "bf16-mixed", True, "torch", 2, 256),
    ("qwen2", "eager", "32-true", False, "torch", 2, 48),
]


@pytest.mark.parametrize(("kind", "attn", "precision", "ckpt", "engine", "batch", "seq"), _CASES)
def test_analytic_peak_matches_the_fake_trace(kind, attn, precision, ckpt, engine, batch, seq):
    """Hugging Face Llama-style models: the analytic peak (model states, activations, gradients at every moment)
    equals the fake-tensor step within 0.5 % (most cases to the kilobyte), with and without checkpointing, eager and
    SDPA, DeepSpeed and plain torch (autocast) alike; the trace matched real MemOptStrategy and Lightning runs."""
    from lightning_memopt.predictor.api import estimate_memory

    model = hf_model(kind, layers=2, attn=attn, tie_word_embeddings=(kind == "qwen2"))
    ids = torch.randint(0, 256, (batch, seq))
    kw = dict(engine=engine, micro_batch_size=batch, seq_len=seq, precision=precision, attention=attn,
              activation_checkpointing=ckpt)  # fmt: skip
    analytic = estimate_memory(resolve_model(model), **kw)
    traced = estimate_memory(model, method="trace", example_batch={"input_ids": ids, "labels": ids}, **kw)
    assert analytic.total == pytest.approx(traced.total, rel=5e-3)


@pytest.mark.parametrize(("attn", "precision", "ckpt"), [("sdpa", "bf16-mixed", True), ("eager", "32-true", False)])
def test_analytic_peak_of_a_plain_pytorch_model_matches_the_fake_trace(attn, precision, ckpt):
    """nn.MultiheadAttention, nn.RMSNorm and a GELU MLP, counted from the module structure alone: within 1 % (a mask
    passed to the attention is converted to a float (s, s) tensor per block, which the structure does not show)."""
    from lightning_memopt.predictor.api import estimate_memory

    torch.manual_seed(0)
    model = PlainLM(hidden=64, attention=attn)  # the accuracy benchmark's plain family
    ids = torch.randint(0, 256, (4, 64))
    kw = dict(micro_batch_size=4, seq_len=64, precision=precision, attention=attn, activation_checkpointing=ckpt)
    analytic = estimate_memory(resolve_model(model), **kw)
    traced = estimate_memory(model, method="trace", example_batch=ids, **kw)
    assert analytic.total == pytest.approx(traced.total, rel=0.01)


def test_eager_keeps_the_scores_and_sdpa_does_not():
    spec = resolve_model("llama-3-8b")
    kw = dict(micro_batch_size=1, compute_bytes=2)
    sdpa = [activation_bytes(spec, seq_len=s, **kw).block for s in (1024, 2048)]
    eager = [activation_bytes(spec, seq_len=s, attention="eager", **kw).block for s in (1024, 2048)]
    assert sdpa[1] == 2 * sdpa[0]  # linear in s
    assert eager[1] > 2 * eager[0]  # quadratic term (s x s scores)


def test_checkpointing_and_liger_save_memory():
    spec = resolve_model("llama-3-8b")
    kw = dict(micro_batch_size=1, seq_len=4096, compute_bytes=2)
    full = activation_bytes(spec, **kw)
    half = activation_bytes(spec, activation_checkpointing=0.5, **kw)
    ckpt = activation_bytes(spec, activation_checkpointing=True, **kw)
    assert ckpt.saved < half.saved < full.saved
    assert ckpt.checkpointed == 32 and half.checkpointed == 16
    flce = activation_bytes(spec, liger={"fused_linear_cross_entropy": True}, **kw)
    assert flce.logits == 0 and flce.saved < full.saved
    assert activation_bytes(spec, liger=True, **kw).block < full.block


def test_bad_checkpointing_and_liger_values():
    with pytest.raises(ValueError):
        num_checkpointed(1.5, 4)
    with pytest.raises(ValueError):
        num_checkpointed(-1, 4)
    with pytest.raises(TypeError):
        num_checkpointed("all", 4)
    with pytest.raises(ValueError, match="rms_norm"):
        activation_bytes(
            resolve_model("gpt2"), micro_batch_size=1, seq_len=8, compute_bytes=2, liger={"rmsnorm": True}
        )


def test_parameter_count_has_no_activations():
    act = activation_bytes(resolve_model("8B"), micro_batch_size=8, seq_len=4096, compute_bytes=2)
    assert act.saved == 0
