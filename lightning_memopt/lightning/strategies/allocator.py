"""The CUDA caching allocator's ``expandable_segments`` for the duration of a fit (``MemOptStrategy``'s default).

With ``expandable_segments:True`` the allocator maps pages into one growing segment per pool instead of calling
``cudaMalloc`` for each new segment, so freed ranges of different sizes are reused and what a run reserves stays close
to what it allocates (``c10/cuda/CUDACachingAllocator.cpp``, ``ExpandableSegment``). Measured on an H200 with the
package's GPU matrix (``benchmarks/results/gpu_2026-12-04/accuracy_matrix.json``): on the 8 Llama rows, reserved
exceeds the allocated peak by 1.3-27 % natively and by 0.7-12 % with expandable segments; a ``MemOptStrategy(zero=2)``
fit reserved 8.93 GB for 5.82 GB allocated. torchtune (#1185), Axolotl and Unsloth turn it on for the same reason
when the user has not configured the allocator.

torch reads ``PYTORCH_CUDA_ALLOC_CONF`` (or ``PYTORCH_ALLOC_CONF``) once, but the setting can change at run time
(:func:`~lightning_memopt.core.compat.set_allocator_settings`): segments already reserved keep their kind, those
created afterwards follow it. The strategy turns it on in ``setup_environment``, before the model moves to the device,
and turns it off again at teardown (no setting outlives the fit). A user's own allocator configuration always wins:
when either variable is set, the default leaves the allocator alone.
"""

from lightning_memopt.core import compat


def validate_expandable_segments(value: "bool | None") -> None:
    """Check ``MemOptStrategy(expandable_segments=...)`` at construction.

    Raises:
        TypeError: a value that is not ``True``, ``False`` or ``None``.
        ValueError: ``True`` while the environment's allocator settings say otherwise (``expandable_segments:False``
            or the ``cudaMallocAsync`` backend, which has no expandable segments).

    Example:
        >>> validate_expandable_segments(None)
        >>> validate_expandable_segments("yes")
        Traceback (most recent call last):
        ...
        TypeError: Expected `expandable_segments` True, False or None, got 'yes'. Fix: e.g. None (the default).
    """
    if value is not None and not isinstance(value, bool):
        raise TypeError(
            f"Expected `expandable_segments` True, False or None, got {value!r}. Fix: e.g. None (the default)."
        )
    configured = compat.allocator_variable()
    if value is not True or configured is None:
        return
    name, conf = configured
    options = compat.allocator_options(conf)
    if options.get("expandable_segments") == "false" or options.get("backend") == "cudamallocasync":
        raise ValueError(
            f"Expected allocator settings that allow expandable segments with `expandable_segments=True`, got"
            f" {name}={conf!r}. Fix: drop `expandable_segments=True` (your {name} is kept) or change {name}."
        )


def expandable_segments_for_fit(value: "bool | None") -> "str | None":
    """Turn expandable segments on for a fit when ``value`` asks for it: ``True``, or ``None`` with neither allocator
    variable set. Returns the setting to restore at teardown (``None``: nothing was changed)."""
    if value is False or (value is None and compat.allocator_variable() is not None):
        return None
    compat.set_allocator_settings("expandable_segments:True")
    return "expandable_segments:False"


def restore_allocator(setting: "str | None") -> None:
    """Put back what :func:`expandable_segments_for_fit` changed (a no-op for ``None``)."""
    if setting is not None:
        compat.set_allocator_settings(setting)
