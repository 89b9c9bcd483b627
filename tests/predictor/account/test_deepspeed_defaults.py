"""The predictor reads DeepSpeed configs without importing DeepSpeed (the CLI stays fast), so it keeps DeepSpeed's
defaults as numbers: this test holds them equal to DeepSpeed's own config model and engine constant."""

from lightning_memopt.core.deepspeed_config import ALLREDUCE_CHUNK, DEEPSPEED_DEFAULTS


def test_the_defaults_are_deepspeeds_own():
    from deepspeed.runtime import engine
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = DeepSpeedZeroConfig()
    theirs = {
        "reduce_bucket_size": zero.reduce_bucket_size,
        "allgather_bucket_size": zero.allgather_bucket_size,
        "stage3_prefetch_bucket_size": zero.prefetch_bucket_size,
        "stage3_param_persistence_threshold": zero.param_persistence_threshold,
        "stage3_max_live_parameters": zero.max_live_parameters,
        "stage3_max_reuse_distance": zero.max_reuse_distance,
        "sub_group_size": zero.sub_group_size,
        "contiguous_gradients": zero.contiguous_gradients,
    }
    assert theirs == DEEPSPEED_DEFAULTS
    assert engine.MEMORY_OPT_ALLREDUCE_SIZE == ALLREDUCE_CHUNK
