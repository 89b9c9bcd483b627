"""fused_linear_cross_entropy: the chunked PyTorch version against PyTorch's cross-entropy; Liger's kernel on a GPU."""

import pytest
import torch
from torch import nn

from lightning_memopt.transforms import fused_linear_cross_entropy

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's Triton kernels need a CUDA GPU")


@pytest.mark.parametrize(("reduction", "bias"), [("mean", False), ("sum", True)])
def test_fused_linear_cross_entropy_matches_reference(reduction, bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True) if bias else None
    labels = torch.randint(0, 40, (2, 9), generator=g)
    labels[0, :3] = -100
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction, chunk_size=4)
    inputs = [hidden, weight] + ([b] if bias else [])
    got = torch.autograd.grad(loss * 3, inputs)
    logits = hidden @ weight.T + (b if bias else 0)
    expected_loss = nn.functional.cross_entropy(
        logits.reshape(-1, 40), labels.reshape(-1), reduction=reduction
    )
    expected = torch.autograd.grad(expected_loss * 3, inputs)
    torch.testing.assert_close(loss, expected_loss)
    for g_got, g_expected in zip(got, expected):
        torch.testing.assert_close(g_got, g_expected)


def test_fused_linear_cross_entropy_bad_input():
    with pytest.raises(ValueError, match="labels of shape"):
        fused_linear_cross_entropy(
            torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 4, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(
            torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), reduction="none"
        )


@pytest.mark.gpu
@gpu
def test_fused_linear_cross_entropy_kernel_on_gpu():
    hidden = torch.randn(64, 32, device="cuda", requires_grad=True)
    weight = torch.randn(100, 32, device="cuda", requires_grad=True)
    labels = torch.randint(0, 100, (64,), device="cuda")
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    expected = nn.functional.cross_entropy(hidden @ weight.T, labels)
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)
    got, ref = torch.autograd.grad(loss, [hidden, weight]), torch.autograd.grad(expected, [hidden, weight])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
