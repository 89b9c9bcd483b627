"""The order a traced step's storages reach the caching allocator in (:func:`op_order`), and what it decides."""

from lightning_memopt.predictor.account.cuda_allocator import simulate
from lightning_memopt.predictor.account.cuda_replay import allocator_settings, op_order, run_events
from lightning_memopt.predictor.device import cuda_rules
from lightning_memopt.predictor.trace.step import TraceResult

MiB = 2**20


def test_an_op_gets_the_blocks_freed_before_it_ran():
    """A chain ``a -> b -> c`` of 256 MiB tensors, each freed once the next exists: op 1 makes ``b`` while ``a`` is
    alive, and ``a`` dies before op 2 makes ``c``. At most two are ever alive, so the allocator holds two blocks, and
    ``c`` reuses ``a``'s. Replaying an op's outputs before the frees recorded at it (the order before this test) held
    all three at op 2: one tensor too many in ``max_memory_allocated``, a 256 MiB segment too many in reserved."""
    size = 256 * MiB
    storages = ((0, 2, size, 1), (1, 3, size, 2), (2, 3, size, 3))  # (made at, freed at, bytes, key)
    step = TraceResult((size, 2 * size, 2 * size), (0, 0, 0), (0, 0, 0), 0, 0, 0, storages=storages)
    assert list(op_order(step)) == [(0, [], [0]), (1, [], [1]), (2, [0], [2]), (3, [1, 2], [])]
    rules = cuda_rules("NVIDIA H200")
    result = simulate(run_events(step, [], [], [], "none", 0, rules, steps=1), allocator_settings(rules))
    workspaces = 2 * rules.workspace_bytes  # cuBLAS's, at the first op and the first op after the forward (op 0)
    assert result.peak_allocated == 2 * size + workspaces
    assert result.peak_reserved == 2 * size + workspaces


def test_a_kept_subset_is_ordered_alike():
    step = TraceResult((8, 8), (0, 0), (0, 0), 0, 0, 0, storages=((0, 1, 8, 1), (0, 2, 4, -1), (1, 2, 8, 2)))
    assert list(op_order(step, keep=[0, 2])) == [(0, [], [0]), (1, [0], [2]), (2, [2], [])]
