"""Fused kernels (Liger-Kernel's Triton kernels) in a fake-tensor trace.

A Liger kernel is a ``torch.autograd.Function`` whose Python wrapper allocates its outputs and saved tensors with
torch and then launches Triton kernels that fill them. The trace runs the wrapper as is, with fake tensors, and
skips the launches (:func:`~lightning_memopt.core.compat.triton_launches_skipped`): what the step allocates and
keeps is then exactly what Liger allocates and keeps, with no GPU. The model is traced as it was given: a model
patched with Liger (``apply_liger`` / the ``LigerKernel`` callback / ``MemOptStrategy(liger=...)``) is traced
with its Liger kernels. A module on a GPU is traced with fake CUDA tensors, so a wrapper that sizes a scratch buffer
by the GPU's multiprocessor count (Liger's RMSNorm weight gradient, ``sm_count x hidden`` fp32) sizes it as the run
does; a config build is traced on the CPU, where that count is one.
"""

import contextlib
from collections.abc import Iterator

from lightning_memopt.core.compat import triton_launches_skipped


@contextlib.contextmanager
def kernel_twins() -> Iterator[None]:
    """Trace with fused kernels reduced to their allocations (see the module docstring)."""
    with triton_launches_skipped():
        yield
