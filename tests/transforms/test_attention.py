import warnings

import pytest
import torch
from torch import nn
from transforms import _models as M

import lightning_memopt.transforms.attention as attention_module
from lightning_memopt import _imports
from lightning_memopt.transforms import applied_transforms, apply_attention

KINDS = ["llama", "qwen2", "mistral", "plain"]


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", KINDS)
def test_sdpa_matches_eager_and_drops_the_s_by_s_term(kind, ids):
    eager, sdpa = M.make(kind), M.make(kind)
    apply_attention(eager, "eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plain model asks for weights: see test_mha_need_weights_warns
        apply_attention(sdpa, "sdpa")
        eager_sizes, sdpa_sizes = M.saved_storage_sizes(eager, ids), M.saved_storage_sizes(sdpa, ids)
        eager_loss, sdpa_loss = M.loss_of(eager, ids), M.loss_of(sdpa, ids)
    eager_loss.backward()
    sdpa_loss.backward()
    torch.testing.assert_close(sdpa_loss, eager_loss)
    for name, grad in M.grads(eager).items():
        torch.testing.assert_close(M.grads(sdpa)[name], grad, msg=name, atol=1e-5, rtol=1e-4)
    s_by_s = 2 * 4 * 128 * 128 * 4  # batch x heads x s x s fp32 probabilities
    assert sum(size >= s_by_s for size in eager_sizes) == 2  # one per layer
    assert max(sdpa_sizes) < s_by_s
    assert sum(eager_sizes) - sum(sdpa_sizes) >= 0.95 * 2 * s_by_s  # SDPA keeps a small (b, h, s) logsumexp
    assert applied_transforms(sdpa)["attention"] == "sdpa"


def test_auto_on_cpu_is_sdpa():
    model = apply_attention(M.make("llama"), "auto")
    assert model.config._attn_implementation == "sdpa"
    assert applied_transforms(model)["attention"] == "sdpa"


def test_hf_switch_back_to_eager():
    model = apply_attention(M.make("qwen2"), "sdpa")
    apply_attention(model, "eager")
    assert model.config._attn_implementation == "eager"
    assert model.model.config._attn_implementation == "eager"


def test_mha_keeps_weights_and_names_and_unpatches():
    mha = nn.MultiheadAttention(16, 4, batch_first=False, kdim=8, vdim=12)
    keys = list(mha.state_dict())
    q, k, v = torch.randn(5, 2, 16), torch.randn(7, 2, 8), torch.randn(7, 2, 12)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, -2:] = True
    expected = mha(q, k, v, key_padding_mask=padding)[0]
    apply_attention(mha, "sdpa")
    out, weights = mha(q, k, v, key_padding_mask=padding, need_weights=False)
    torch.testing.assert_close(out, expected)
    assert weights is None and list(mha.state_dict()) == keys
    apply_attention(mha, "eager")
    assert mha(q, k, v, key_padding_mask=padding)[1] is not None


def test_mha_need_weights_warns():
    attention_module._warning_cache.clear()  # warned once per process: forget earlier tests
    mha = apply_attention(nn.MultiheadAttention(8, 2), "sdpa")
    x = torch.randn(3, 1, 8)
    with pytest.warns(UserWarning, match="does not return attention weights"):
        assert mha(x, x, x)[1] is None


def test_unknown_name():
    with pytest.raises(ValueError, match="one of"):
        apply_attention(M.make("llama"), "flash")


@pytest.mark.skipif(bool(_imports._FLASH_ATTN_AVAILABLE), reason="flash-attn is installed")
def test_flash_without_flash_attn():
    with pytest.raises(ModuleNotFoundError, match="flash-attn"):
        apply_attention(M.make("llama"), "flash_attention_2")


def test_flash_on_cpu(monkeypatch):
    monkeypatch.setattr(_imports, "_FLASH_ATTN_AVAILABLE", True)  # reach the device check without the package
    with pytest.raises(ValueError, match="CUDA device"):
        apply_attention(M.make("llama"), "flash_attention_2")
    with pytest.raises(ValueError, match="fp16 or bf16"):
        apply_attention(M.make("llama"), "flash_attention_2", device="cuda")
    with pytest.raises(ValueError, match="only for Hugging Face"):
        apply_attention(M.make("plain"), "flash_attention_2", device="cuda", dtype=torch.bfloat16)


def test_nothing_to_switch():
    with pytest.raises(ValueError, match="no attention to switch"):
        apply_attention(nn.Linear(2, 2), "sdpa")
