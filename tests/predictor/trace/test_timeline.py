import torch
from predictor._modules import tiny_config

from lightning_memopt.planning import estimate_memory
from lightning_memopt.predictor.trace import timeline
from lightning_memopt.predictor.trace.batch import batch_shape, resize_batch
from lightning_memopt.predictor.trace.timeline import Timeline


def test_micro_batches_come_from_two_traces_and_match_a_direct_trace(monkeypatch):
    """Activations are affine in the micro-batch: a config's estimates at any micro-batch reuse the traces at 2 and 3
    (checked once against a trace at 4), and equal a direct trace."""
    config = tiny_config("qwen2", layers=2, attention_bias=True)
    interpolated = estimate_memory(config, micro_batch_size=7, seq_len=32, attention="eager")
    assert interpolated.details["micro_batch_from"].startswith("affine")
    traced = []
    real_trace = timeline.trace_timeline
    monkeypatch.setattr(timeline, "trace_timeline", lambda *a, **k: traced.append(1) or real_trace(*a, **k))
    estimate_memory(config, micro_batch_size=11, seq_len=32, attention="eager")
    assert not traced  # no new trace
    monkeypatch.setattr(timeline, "_CACHE", type(timeline._CACHE)())
    monkeypatch.setattr(timeline, "_AFFINE", {})
    monkeypatch.setattr(timeline, "_affine", lambda *a: None)  # every micro-batch traced directly
    direct = estimate_memory(config, micro_batch_size=7, seq_len=32, attention="eager")
    assert direct.total == interpolated.total and direct.activations == interpolated.activations


def test_a_configs_recorded_step_is_reused_by_the_next_cuda_estimate(monkeypatch):
    """The caching allocator's replay reads every storage of the step at the asked micro-batch: a config's is
    recorded once per setting and micro-batch (a planner asks again and again), like its timelines."""
    config = tiny_config("llama", layers=9)
    kwargs = dict(seq_len=32, engine="torch", device="h100")
    first = estimate_memory(config, micro_batch_size=5, **kwargs)
    traced = []
    real_trace = timeline.trace_timeline

    def counted(*args, **kwargs):
        traced.append(kwargs.get("record"))
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(timeline, "trace_timeline", counted)
    again = estimate_memory(config, micro_batch_size=5, **kwargs)
    assert traced == [] and (again.total, again.reserved) == (first.total, first.reserved)
    estimate_memory(config, micro_batch_size=6, **kwargs)
    assert traced == [True]  # the timeline from the traces at 2 and 3, the recorded step at 6


def test_an_example_batch_is_resized_to_the_micro_batch():
    batch = {"input_ids": torch.arange(6).view(2, 3), "labels": torch.arange(6).view(2, 3), "flag": 1}
    resized = resize_batch(batch, 2, 5)
    assert resized["input_ids"].tolist() == [[0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5], [0, 1, 2]]
    assert resized["flag"] == 1 and batch_shape(resized) == (5, 3)


def test_moments_keep_the_highest_op_between_gradients():
    line = Timeline((1, 5, 2, 3, 1), (0, 0, 0, 4, 4), (0, 0, 0, 0, 0), 1)
    assert list(line.moments()) == [(5, 0, 0, True, 0), (2, 0, 0, False, 0), (3, 4, 0, False, 0)]


def test_a_deep_model_under_zero3_is_traced_at_reduced_depth_and_estimated_as_in_full(monkeypatch):
    """Under ZeRO-3 a deep model is traced at reduced depth too: DeepSpeed's fetch and release events of the skipped
    blocks are written out and replayed on the whole module trace (:mod:`~lightning_memopt.predictor.trace.expand`), so
    the estimate is the one a trace of every block gives (reduced-depth traces written out per block, without the
    replay, missed the kept parameters: -7.7 % on this model)."""
    config = tiny_config("llama", layers=12)
    zero = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 4096, "stage3_param_persistence_threshold": 64,
                                  "stage3_max_reuse_distance": 100_000, "stage3_prefetch_bucket_size": 30_000,
                                  "stage3_max_live_parameters": 150_000}}  # fmt: skip
    run = dict(world_size=2, micro_batch_size=2, seq_len=32, precision="bf16-mixed")
    reduced = estimate_memory(config, zero=3, deepspeed_config=zero, **run)
    assert reduced.details["traced_blocks"] < 12 and "synthesis" not in reduced.details
    monkeypatch.setattr(timeline, "_CACHE", type(timeline._CACHE)())
    monkeypatch.setattr(timeline, "SYNTHESIS_MIN_BLOCKS", 10**9)  # the full trace, the reference
    full = estimate_memory(config, zero=3, deepspeed_config=zero, **run)
    assert full.details["traced_blocks"] == 12
    assert (reduced.total, reduced.parameters, reduced.activations) == (full.total, full.parameters, full.activations)
