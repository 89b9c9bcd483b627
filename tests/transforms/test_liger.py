import sys

import pytest
import torch
from torch import nn
from transforms import _models as M

import lightning_memopt.transforms.liger as liger_module
from lightning_memopt.transforms import applied_transforms, apply_liger

HF_KINDS = ["llama", "qwen2", "mistral"]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's Triton kernels need a CUDA GPU")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def _modeling(kind: str):
    return sys.modules[type(M.hf_model(kind)).__module__]


@pytest.mark.parametrize("kind", HF_KINDS)
def test_patching_leaves_other_models_and_globals_untouched(kind, ids):
    other = M.hf_model(kind, seed=1)
    expected = M.loss_of(other, ids).detach()
    modeling = _modeling(kind)
    globals_before = dict(vars(modeling))
    model = apply_liger(M.hf_model(kind), allow_cpu=True)
    record = applied_transforms(model)["liger"]
    assert record["models"] == [
        {
            "model_type": kind,
            "kernels": ["fused_linear_cross_entropy", "rms_norm", "rope", "swiglu"],
            "not_supported": [],
        }
    ]
    assert record["process_wide"] == []
    assert dict(vars(modeling)) == globals_before
    # an existing and a newly built unpatched model still compute what they did, on CPU
    torch.testing.assert_close(M.loss_of(other, ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(M.loss_of(M.hf_model(kind, seed=1), ids), expected, rtol=0, atol=0)
    assert (
        type(model.model.norm).__name__ != "LigerRMSNorm" and model.model.norm._get_name() == "LigerRMSNorm"
    )


@cpu_only
def test_patched_instance_runs_liger_rope(ids):
    # only RoPE is patched: the instance reaches Liger's Triton kernel (no driver on CPU), another model does
    # not
    model = apply_liger(
        M.hf_model("llama"), rms_norm=False, swiglu=False, fused_linear_cross_entropy=False, allow_cpu=True
    )
    assert applied_transforms(model)["liger"]["models"][0]["kernels"] == ["rope"]
    with pytest.raises(RuntimeError, match="driver"):
        M.loss_of(model, ids)
    M.loss_of(M.hf_model("llama"), ids)


def test_cross_entropy_stays_on_the_instance(ids):
    reference = torch.nn.functional.cross_entropy
    model = apply_liger(
        M.hf_model("llama"),
        cross_entropy=True,
        fused_linear_cross_entropy=False,
        rope=False,
        rms_norm=False,
        swiglu=False,
        allow_cpu=True,
    )
    assert torch.nn.functional.cross_entropy is reference
    assert applied_transforms(model)["liger"]["process_wide"] == []
    seen = []  # the cross-entropy in place while the instance's forward runs (its loss is computed there)
    model.lm_head.register_forward_hook(lambda *args: seen.append(torch.nn.functional.cross_entropy))
    try:
        M.loss_of(model, ids)
    except RuntimeError as err:  # without a GPU, Liger's Triton kernel finds no driver
        assert "driver" in str(err)
    assert seen[0].__module__.startswith("liger_kernel")
    assert torch.nn.functional.cross_entropy is reference  # put back after the call, also when it failed
    other, unpatched = [], M.hf_model("llama")
    unpatched.lm_head.register_forward_hook(lambda *args: other.append(torch.nn.functional.cross_entropy))
    M.loss_of(unpatched, ids)
    assert other == [reference]


def test_checkpointed_blocks_recompute_with_the_instance_rope(ids, monkeypatch):
    """A block that activation checkpointing recomputes in backward runs the instance's RoPE again (a stand-in that
    counts its calls and runs PyTorch's RoPE, so that it runs on CPU); another model never reaches it."""
    from liger_kernel.transformers import monkey_patch
    from transformers.models.llama import modeling_llama

    from lightning_memopt.transforms import apply_activation_checkpointing

    calls, torch_rope = [], modeling_llama.apply_rotary_pos_emb

    def counting_rope(*args, **kwargs):
        calls.append(1)
        return torch_rope(*args, **kwargs)

    monkeypatch.setattr(monkey_patch, "liger_rotary_pos_emb", counting_rope)
    model = apply_liger(M.hf_model("llama", layers=2), rms_norm=False, swiglu=False,
                        fused_linear_cross_entropy=False, allow_cpu=True)  # fmt: skip
    assert modeling_llama.apply_rotary_pos_emb is torch_rope
    apply_activation_checkpointing(model)
    loss = M.loss_of(model, ids)
    assert len(calls) == 2  # one per block
    loss.backward()
    assert len(calls) == 4  # each block recomputed with it
    M.loss_of(M.hf_model("llama"), ids).backward()
    assert len(calls) == 4


def test_plain_rms_norm_is_patched():
    model = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8), nn.RMSNorm(8, elementwise_affine=False))
    apply_liger(model, allow_cpu=True)
    assert applied_transforms(model)["liger"]["rms_norm_modules"] == ["1"]
    assert model[1]._get_name() == "LigerRMSNorm"


def test_unsupported_model_type_strict_and_not():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ValueError, match="'gpt2'"):
        apply_liger(model, allow_cpu=True)
    liger_module._warning_cache.clear()
    with pytest.warns(UserWarning, match="'gpt2'"):
        apply_liger(model, strict=False, allow_cpu=True)
    assert applied_transforms(model)["liger"]["skipped"] == ["gpt2"]


def test_nothing_to_patch():
    with pytest.raises(ValueError, match="nothing to patch"):
        apply_liger(nn.Linear(2, 2), allow_cpu=True)


def test_both_cross_entropies():
    with pytest.raises(ValueError, match="at most one"):
        apply_liger(M.hf_model("llama"), cross_entropy=True, allow_cpu=True)


@cpu_only
def test_liger_on_cpu_is_an_error():
    with pytest.raises(ValueError, match="CUDA device"):
        apply_liger(M.hf_model("llama"))
    with pytest.raises(ValueError, match="CUDA device"):
        apply_liger(M.hf_model("llama"), device="cpu")


def test_switch_type():
    with pytest.raises(TypeError, match="rope"):
        apply_liger(M.hf_model("llama"), rope=1, allow_cpu=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", HF_KINDS)
def test_liger_numerics_match_unpatched_on_gpu(kind):
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    reference, model = M.hf_model(kind, attn="sdpa").cuda(), M.hf_model(kind, attn="sdpa").cuda()
    apply_liger(model)
    expected = M.loss_of(reference, ids)
    loss = M.loss_of(model, ids)
    expected.backward()
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)
    for name, grad in M.grads(reference).items():
        torch.testing.assert_close(M.grads(model)[name], grad, atol=1e-3, rtol=1e-3, msg=name)
