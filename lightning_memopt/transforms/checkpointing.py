"""Activation checkpointing of repeated blocks, for Hugging Face models and plain modules alike.

A checkpointed block keeps only its inputs during the forward pass and recomputes its activations in backward
(Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost", section 3): on an L-block stack the saved
activations drop from about L blocks' worth to the block inputs plus one block recomputed at a time.

The block's ``forward`` is replaced on the instance (module names, ``state_dict`` keys and forward hooks are
unchanged, as in transformers' ``GradientCheckpointingLayer``), so DeepSpeed ZeRO-3's parameter-gathering
hooks of the block's children run again during the recomputation. Under ZeRO-3 (parameters carrying ``ds_id``)
the recomputation's metadata check is switched off (``determinism_check="none"``): the recorded shapes of
partitioned parameters differ from the gathered ones, which is the ``CheckpointError`` of transformers #47254
/ DeepSpeed #4332.
"""

from torch import nn

from lightning_memopt.core.blocks import Policy, checkpoint_block, find_blocks, num_checkpointed, uncheckpoint_block
from lightning_memopt.transforms._applied import _forget, _record

#: the blocks a policy selects (the package's one rule, :func:`lightning_memopt.core.blocks.find_blocks`)
blocks_to_checkpoint = find_blocks


def apply_activation_checkpointing(
    module: nn.Module,
    policy: Policy = "auto",
    *,
    fraction: float | None = None,
    every_k: int | None = None,
    reentrant: bool = False,
) -> nn.Module:
    """Checkpoint the blocks of ``module`` that ``policy`` selects, in place; return ``module``.

    Applying again replaces an earlier application (blocks no longer selected are restored). What was wrapped
    is
    recorded: ``applied_transforms(module)["activation_checkpointing"]``.

    Args:
        module: the model (Hugging Face, plain ``nn.Module`` or LightningModule).
        policy: which blocks, see :func:`blocks_to_checkpoint`.
        fraction: checkpoint the first ``ceil(fraction * n)`` of the ``n`` candidate blocks, ``0 < fraction <=
            1``.
        every_k: checkpoint every ``every_k``-th candidate block (indices 0, k, 2k, ...), ``every_k >= 1``.
        reentrant: use the reentrant implementation (not recommended; keyword inputs are bound, not
            differentiated through).

    Raises:
        ValueError: a bad ``fraction``/``every_k``, both given, or a policy that selects nothing.
        TypeError: a policy of another type.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> stack = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(4)])
        >>> _ = apply_activation_checkpointing(stack, {"Sequential"}, fraction=0.5)
        >>> from lightning_memopt.transforms import applied_transforms
        >>> applied_transforms(stack)["activation_checkpointing"]["blocks"]
        ['0', '1']
        >>> stack(torch.randn(2, 4, requires_grad=True)).sum().backward()
    """
    _validate_selection(fraction, every_k)
    if not isinstance(reentrant, bool):
        raise TypeError(f"Expected `reentrant` to be a bool, got {reentrant!r}. Fix: pass True or False.")
    candidates = blocks_to_checkpoint(module, policy)
    if fraction is not None:
        chosen = candidates[: num_checkpointed(float(fraction), len(candidates))]
    elif every_k is not None:
        chosen = candidates[::every_k]
    else:
        chosen = list(candidates)
    remove_activation_checkpointing(module)
    for name in chosen:
        checkpoint_block(module.get_submodule(name), reentrant)
    _record(
        module,
        "activation_checkpointing",
        {
            "blocks": chosen,
            "candidates": len(candidates),
            "fraction": len(chosen) / len(candidates),
            "reentrant": reentrant,
        },
    )
    return module


def remove_activation_checkpointing(module: nn.Module) -> nn.Module:
    """Undo :func:`apply_activation_checkpointing` on every block of ``module``; return ``module``.

    Example:
        >>> from torch import nn
        >>> stack = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        >>> _ = remove_activation_checkpointing(apply_activation_checkpointing(stack))
        >>> "forward" in stack[0].__dict__
        False
    """
    for sub in module.modules():
        uncheckpoint_block(sub)
    _forget(module, "activation_checkpointing")
    return module


def _validate_selection(fraction: float | None, every_k: int | None) -> None:
    if fraction is not None and every_k is not None:
        raise ValueError(
            f"Expected at most one of `fraction` and `every_k`, got fraction={fraction} and"
            f" every_k={every_k}. Fix: pass only one."
        )
    if fraction is not None and (
        isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1
    ):
        raise ValueError(
            f"Expected `fraction` in (0, 1], got {fraction!r}. Fix: e.g. fraction=0.5 for half the blocks."
        )
    if every_k is not None and (isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1):
        raise ValueError(f"Expected `every_k` to be an int >= 1, got {every_k!r}. Fix: e.g. every_k=2.")
