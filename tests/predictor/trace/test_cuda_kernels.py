"""The temporaries CUDA's kernels allocate inside an op (``kernel_scratch``), for shapes the recorded H200 runs do not
cover: the launch configuration must follow the memory layout, and anything it does not stage must cost nothing."""

import pytest
import torch

from lightning_memopt.predictor.device import KernelDevice
from lightning_memopt.predictor.trace.cuda_kernels import kernel_scratch, reduce_buffers

SUM = torch.ops.aten.sum.dim_IntList
MiB = 2**20


def test_a_reduction_follows_the_layout_not_the_dimension_numbers():
    """``TensorIterator`` orders dimensions by stride: summing a transposed matrix over its (slow) dimension 1 is the
    same launch as summing the matrix itself over its dimension 0, and so the same staging buffer."""
    matrix = torch.zeros(4096, 1024)
    transposed = matrix.t()  # strides (1, 1024): its dimension 1 moves slowest
    assert reduce_buffers(transposed, [1], KernelDevice()) == reduce_buffers(matrix, [0], KernelDevice()) != ()
    # three reduced dimensions, contiguous, merge into one: as the flattened tokens
    tokens = torch.zeros(2, 2, 1024, 1024)
    assert reduce_buffers(tokens, [0, 1, 2], KernelDevice()) == reduce_buffers(torch.zeros(4096, 1024), [0],
                                                                                KernelDevice())  # fmt: skip


def test_reductions_within_thread_blocks_and_degenerate_inputs_cost_nothing():
    assert reduce_buffers(torch.zeros(4, 1024, 1024), [-1], KernelDevice()) == ()  # along the fastest dimension
    assert reduce_buffers(torch.zeros(64, 64), [0], KernelDevice()) == ()  # too few values a thread
    assert kernel_scratch(SUM, (torch.zeros(()), [0])) == ()  # a scalar
    assert kernel_scratch(SUM, (torch.zeros(0, 1024), [0])) == ()  # empty
    assert kernel_scratch(SUM, (torch.zeros(4096, 1024, dtype=torch.long), [0])) == ()  # not floating: not ported
    assert kernel_scratch(torch.ops.aten.mul.Tensor, (torch.zeros(8), torch.zeros(8))) == ()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_staging_buffer_holds_one_accumulator_per_output_and_block(dtype):
    """fp32 accumulators for 32- and 16-bit inputs, fp64 for double: a bias gradient over 4,096 tokens of 4,096
    features on an H100 takes 64 blocks per output column, each lane of a warp its own output (4 per lane)."""
    buffer, semaphores = reduce_buffers(torch.zeros(4096, 4096, dtype=dtype), [0], KernelDevice())
    accumulator = 8 if dtype == torch.float64 else 4
    assert buffer == accumulator * 4096 * 64 * 32 * 4
    assert semaphores == 4 * 4096 // 4 // 32  # one int per block column
    assert buffer // MiB == (256 if dtype == torch.float64 else 128)
