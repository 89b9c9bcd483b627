"""Fused kernels (Liger-Kernel's Triton kernels) in a fake-tensor trace.

A Liger kernel is a ``torch.autograd.Function`` whose Python wrapper allocates its outputs and saved tensors with
torch and then launches Triton kernels that fill them. The trace runs the wrapper as is, with fake tensors, and
skips the launches (:func:`~lightning_memopt.core.compat.triton_launches_skipped`): what the step allocates and
keeps is then exactly what Liger allocates and keeps, with no GPU. The model is traced as it was given: a model
patched with Liger (``apply_liger`` / the ``LigerKernel`` callback / ``MemOptStrategy(liger=...)``) is traced
with its Liger kernels. One difference from a GPU run remains: the fake tensors are CPU tensors, so a wrapper that
sizes a scratch buffer by the GPU's multiprocessor count (Liger's RMSNorm weight gradient, ``sm_count x hidden``
fp32) sizes it for one.
"""

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from lightning_memopt.core.compat import triton_launches_skipped


@contextlib.contextmanager
def kernel_twins(module: nn.Module, liger: Any = False) -> Iterator[None]:
    """Trace ``module`` with its fused kernels reduced to their allocations (see the module docstring).

    ``liger``: the Liger switches the caller expects on ``module``; the module itself decides what runs.
    """
    del module, liger  # the module's own kernels run as they are patched
    with triton_launches_skipped():
        yield
