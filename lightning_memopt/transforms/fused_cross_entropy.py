"""Cross-entropy of a linear layer's output without the full logits in memory: Liger's fused kernel on CUDA, a chunked
PyTorch version elsewhere, and DeepSpeed ZeRO-3's partitioned ``lm_head`` gathered around it (Liger-Kernel #767)."""

from typing import Any

import torch
from torch import Tensor

from lightning_memopt import _imports


def fused_linear_cross_entropy(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int = 1024,
) -> Tensor:
    """Cross-entropy of ``hidden @ lm_head_weight.T (+ bias)`` against ``labels``, logits never all in memory.

    On CUDA this is Liger's fused kernel (Hsu et al. 2024, "Liger Kernel", section 3.2); elsewhere a chunked
    PyTorch version of the same method (logits of ``chunk_size`` rows at a time, gradients computed in
    forward), so the same LightningModule runs on CPU. Under DeepSpeed ZeRO-3 (the weight carries ``ds_id``)
    the weight and bias are gathered for the call unless DeepSpeed already gathered them (as it does when they
    are read through their module inside the engine's forward, e.g. in a LightningModule's ``training_step``).
    Labels are not shifted: shift them for causal LM.

    Args:
        hidden: ``(..., hidden_size)`` final hidden states.
        lm_head_weight: ``(vocab, hidden_size)`` output projection.
        labels: ``(...)`` target ids, ``ignore_index`` where no loss is taken.
        bias: optional ``(vocab,)`` output bias.
        ignore_index: label id that is ignored.
        reduction: ``"mean"`` (over non-ignored tokens) or ``"sum"``.
        chunk_size: rows per chunk in the PyTorch version.

    Example:
        >>> import torch
        >>> h, w = torch.randn(6, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
        >>> y = torch.tensor([1, 2, 3, -100, 5, 6])
        >>> loss = fused_linear_cross_entropy(h, w, y)
        >>> torch.allclose(loss, torch.nn.functional.cross_entropy(h @ w.T, y))
        True
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"Expected reduction 'mean' or 'sum', got {reduction!r}.")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"Expected labels of shape {tuple(hidden.shape[:-1])} (hidden without its last dim), got"
            f" {tuple(labels.shape)}. Fix: shift/flatten hidden and labels alike."
        )
    hidden2d, labels1d = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    params = _partitioned([lm_head_weight, bias])
    if params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return _flce(hidden2d, lm_head_weight, labels1d, bias, ignore_index, reduction, chunk_size)
    return _flce(hidden2d, lm_head_weight, labels1d, bias, ignore_index, reduction, chunk_size)


def _flce(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, ignore_index: int, reduction: str, chunk: int
) -> Tensor:
    if hidden.is_cuda and _imports._LIGER_KERNEL_AVAILABLE:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction
        )
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, bias, ignore_index, reduction, chunk)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Linear + cross-entropy by row chunks, gradients computed in forward (as Liger's kernel does)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        bias: Tensor | None,
        ignore_index: int,
        reduction: str,
        chunk: int,
    ) -> Tensor:
        valid = labels != ignore_index
        denominator = (
            valid.sum().clamp(min=1) if reduction == "mean" else torch.ones((), device=hidden.device)
        )
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
        for start in range(0, hidden.shape[0], chunk):
            h, y, ok = (
                hidden[start : start + chunk],
                labels[start : start + chunk],
                valid[start : start + chunk],
            )
            logits = (h @ weight.T + (bias if bias is not None else 0)).float()
            log_probs = torch.log_softmax(logits, dim=-1)
            target = y.clamp(min=0).unsqueeze(1)
            loss += -(log_probs.gather(1, target).squeeze(1) * ok).sum()
            grad_logits = log_probs.exp()
            grad_logits.scatter_add_(1, target, -torch.ones_like(target, dtype=grad_logits.dtype))
            grad_logits *= ok.unsqueeze(1) / denominator
            grad_hidden[start : start + chunk] = (grad_logits @ weight.float()).to(hidden.dtype)
            grad_weight += grad_logits.T @ h.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return (loss / denominator).to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_bias = ctx.grad_bias * grad_output if ctx.grad_bias is not None else None
        return grad_hidden * grad_output, grad_weight * grad_output, None, grad_bias, None, None, None


def _partitioned(params: list[Tensor | None]) -> list[Tensor]:
    """The ZeRO-3 parameters among ``params`` that are not gathered now.

    Inside a DeepSpeed engine's forward, reading a parameter through its module already gathers it
    (DeepSpeed's external-parameter getter): those are left to DeepSpeed, which would refuse a second owner.
    """
    return [
        p for p in params if p is not None and hasattr(p, "ds_id") and p.ds_status.name == "NOT_AVAILABLE"
    ]
