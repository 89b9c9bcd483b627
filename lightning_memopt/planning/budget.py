"""Budget-driven activation checkpointing: wrap the fewest blocks whose predicted peak fits a memory budget.

Checkpointing a block trades one more forward of that block for its saved activations (Chen et al. 2016,
"Training Deep Nets with Sublinear Memory Cost", section 3). The predicted step peak
(:func:`~lightning_memopt.planning.estimate_memory`) falls monotonically with the number ``k`` of
checkpointed blocks, so a binary search over ``k`` finds the smallest one that fits: compute is spent only
where memory demands it. The first ``k`` blocks are wrapped
(``apply_activation_checkpointing(fraction=k/n)``).
"""

import math
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from lightning_memopt.core.units import format_bytes, parse_bytes
from lightning_memopt.transforms._applied import _record
from lightning_memopt.transforms.checkpointing import (
    Policy,
    apply_activation_checkpointing,
    blocks_to_checkpoint,
    remove_activation_checkpointing,
)

_KEY = "checkpoint_plan"
_OWN = ("model", "activation_checkpointing")


@dataclass(frozen=True)
class CheckpointPlan:
    """What :func:`checkpoint_to_fit` chose, in bytes per rank.

    Attributes:
        blocks: names of the checkpointed blocks (the first ``num_checkpointed`` candidates).
        num_checkpointed: ``k``, the number of checkpointed blocks.
        num_blocks: ``n``, the number of candidate blocks.
        predicted_peak: the predicted peak with ``k`` blocks checkpointed.
        peak_without_checkpointing: the predicted peak with none.
        peak_full_checkpointing: the predicted peak with all ``n``.
        budget: the memory budget searched against.

    Example:
        >>> plan = CheckpointPlan(("layers.0",), 1, 4, 900, 1000, 700, 950)
        >>> plan.fraction, plan.fits
        (0.25, True)
    """

    blocks: tuple[str, ...]
    num_checkpointed: int
    num_blocks: int
    predicted_peak: int
    peak_without_checkpointing: int
    peak_full_checkpointing: int
    budget: int

    def __post_init__(self) -> None:
        if not 0 <= self.num_checkpointed <= self.num_blocks or len(self.blocks) != self.num_checkpointed:
            raise ValueError(
                f"Expected 0 <= num_checkpointed <= num_blocks with one name per checkpointed block, got"
                f" k={self.num_checkpointed}, n={self.num_blocks} and {len(self.blocks)} names."
            )

    @property
    def fraction(self) -> float:
        """``k / n``, the fraction of candidate blocks checkpointed."""
        return self.num_checkpointed / self.num_blocks if self.num_blocks else 0.0

    @property
    def fits(self) -> bool:
        """Whether the predicted peak is within the budget."""
        return self.predicted_peak <= self.budget

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict (``blocks`` as a list)."""
        out = asdict(self)
        out["blocks"] = list(self.blocks)
        return out

    def __str__(self) -> str:
        return (
            f"checkpointing {self.num_checkpointed} of {self.num_blocks} blocks: predicted peak"
            f" {_fmt(self.predicted_peak)} <= budget {_fmt(self.budget)} (none:"
            f" {_fmt(self.peak_without_checkpointing)}, all: {_fmt(self.peak_full_checkpointing)})"
        )


def checkpoint_to_fit(
    module: nn.Module,
    budget: float | str,
    *,
    policy: Policy = "auto",
    reentrant: bool = False,
    **estimate_kwargs: Any,
) -> CheckpointPlan:
    """Checkpoint the fewest leading blocks of ``module`` whose predicted step peak fits ``budget``, in place.

    The predictor traces ``module`` itself (its attention and kernels as they are) with the run's settings in
    ``estimate_kwargs`` (``micro_batch_size``, ``seq_len``, ``precision``, ``zero``, ``world_size``, ``engine``,
    ``optimizer``, ``deepspeed_config``, ``example_batch`` for a model that is not a Hugging Face one, ...), with
    its first ``k`` candidate blocks checkpointed as the transform wraps them. With ``k = 0`` nothing is wrapped
    (an earlier checkpointing is removed). The plan is recorded in ``applied_transforms(module)["checkpoint_plan"]``;
    the wrapped blocks, as usual, under ``"activation_checkpointing"``.

    Args:
        module: the model (Hugging Face, plain ``nn.Module`` or LightningModule).
        budget: bytes per rank, or a string such as ``"24GiB"``.
        policy: which blocks are candidates, see :func:`~lightning_memopt.transforms.blocks_to_checkpoint`.
        reentrant: use the reentrant checkpoint implementation.
        **estimate_kwargs: keyword arguments of :func:`~lightning_memopt.planning.estimate_memory` but
            ``model`` and ``activation_checkpointing``.

    Returns:
        The :class:`CheckpointPlan`.

    Raises:
        ValueError: an unparsable or non-positive budget, a budget below the predicted peak with every block
            checkpointed (the message gives that peak and other changes that would fit), a policy that
            selects nothing, or an invalid predictor argument.
        TypeError: ``model`` or ``activation_checkpointing`` among ``estimate_kwargs``.

    Example:
        >>> import transformers
        >>> config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
        ...     num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2)
        >>> model = transformers.LlamaForCausalLM(config)
        >>> kw = dict(engine="torch", precision="32-true", micro_batch_size=2, seq_len=256, attention="sdpa")
        >>> plan = checkpoint_to_fit(model, "16MiB", **kw)
        >>> plan.num_checkpointed, plan.num_blocks, plan.predicted_peak <= 16 * 2**20
        (4, 8, True)
    """
    from lightning_memopt.planning.estimate import estimate_memory

    limit = _parse_budget(budget)
    given = sorted(set(_OWN) & set(estimate_kwargs))
    if given:
        raise TypeError(
            f"Expected the estimate_memory arguments without {list(_OWN)}, got {given}. Fix: drop them;"
            " checkpoint_to_fit passes the module and searches the number of checkpointed blocks itself."
        )
    candidates = blocks_to_checkpoint(module, policy)
    n = len(candidates)
    kwargs = dict(estimate_kwargs)
    peaks: dict[int, int] = {}

    def checkpoint(k: int) -> None:
        if k:
            apply_activation_checkpointing(module, policy, fraction=k / n, reentrant=reentrant)
        else:
            remove_activation_checkpointing(module)

    def peak(k: int) -> int:  # the module with its first k candidates checkpointed, traced as it is
        if k not in peaks:
            checkpoint(k)
            peaks[k] = int(estimate_memory(module, **kwargs).total)
        return peaks[k]

    if peak(n) > limit:
        raise ValueError(_no_fit_message(module, kwargs, limit, peak(n), n))
    lo, hi = -1, n  # invariant: peak(hi) fits; lo does not (or is below 0)
    if peak(0) <= limit:
        hi = 0
    else:
        lo = 0
    while hi - lo > 1:  # the predicted peak does not grow with k (fewer saved blocks), so binary search
        mid = (lo + hi) // 2
        if peak(mid) <= limit:
            hi = mid
        else:
            lo = mid
    checkpoint(hi)
    plan = CheckpointPlan(tuple(candidates[:hi]), hi, n, peak(hi), peak(0), peak(n), limit)
    _record(module, _KEY, plan.to_dict())
    return plan


def _fmt(num_bytes: int) -> str:
    return format_bytes(num_bytes, "GiB" if num_bytes >= 2**30 else "MiB")


def _parse_budget(budget: Any) -> int:
    try:
        limit = parse_bytes(budget)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"Expected the memory budget as bytes or a size like '24GiB', got {budget!r}. Fix: e.g."
            f" budget='24GiB' or budget=24 * 2**30. ({err})"
        ) from err
    if limit <= 0:
        raise ValueError(f"Expected a positive memory budget, got {budget!r}. Fix: e.g. budget='24GiB'.")
    return limit


def _no_fit_message(module: nn.Module, kwargs: dict[str, Any], limit: int, full: int, n: int) -> str:
    """With every block checkpointed (as the module is now) nothing fits: what else would."""
    from lightning_memopt.planning.estimate import estimate_memory

    def peak(**change: Any) -> int:
        return int(estimate_memory(module, **{**kwargs, **change}).total)

    fixes = []
    micro = int(kwargs.get("micro_batch_size", 1))
    lo, hi = 0, micro  # the largest smaller micro-batch that fits (the peak grows with it)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(micro_batch_size=mid) <= limit else (lo, mid)
    if lo:
        fixes.append(
            f"micro_batch_size={lo} with {math.ceil(micro / lo)}x gradient accumulation fits"
            f" ({_fmt(peak(micro_batch_size=lo))})"
        )
    if kwargs.get("attention") == "eager":
        fixes.append(f"attention='sdpa' predicts {_fmt(peak(attention='sdpa'))}")
    fixes.append(
        "a higher ZeRO stage or optimizer offload (lightning_memopt.planning.suggest_fixes ranks them)"
    )
    return (
        f"Expected a memory budget of at least the predicted peak with all {n} blocks of"
        f" {type(module).__name__} checkpointed ({_fmt(full)}), got {_fmt(limit)}. Fix: raise the budget or"
        f" save memory elsewhere: {'; '.join(fixes)}."
    )
