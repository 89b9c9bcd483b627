"""The predictor reads DeepSpeed configs without importing DeepSpeed (the CLI stays fast), so it keeps DeepSpeed's
defaults as numbers: this test holds them equal to DeepSpeed's own config model and engine constant."""

import pytest

from lightning_memopt.core.deepspeed_config import ALLREDUCE_CHUNK, DEEPSPEED_DEFAULTS, LeafModules


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
    leaf = zero.leaf_module
    assert LeafModules() == LeafModules(tuple(leaf.classes), tuple(leaf.names), tuple(leaf.name_suffixes))


@pytest.mark.parametrize("section", [
    None,
    {},
    {"classes": "MyBlock"},
    {"names": ["model.layers.0.mlp", "model.layers.0.mlp"], "name_suffixes": "mlp"},
    {"classes": [], "name_suffixes": ["experts", "mlp"]},
])  # fmt: skip
def test_the_leaf_modules_of_a_config_are_read_as_deepspeed_reads_them(section):
    """One string for a list of one, repeats dropped, DeepSpeed's default classes where ``classes`` is not given."""
    from deepspeed.runtime.zero.leaf_module_config import DeepSpeedZeroLeafModuleConfig

    theirs = DeepSpeedZeroLeafModuleConfig(**(section or {}))
    config = {"zero_optimization": {"stage": 3} if section is None else {"stage": 3, "leaf_module": section}}
    expected = LeafModules(tuple(theirs.classes), tuple(theirs.names), tuple(theirs.name_suffixes))
    assert LeafModules.from_config(config) == expected


@pytest.mark.parametrize(("section", "message"), [
    (["mlp"], "to be a mapping with keys classes, names, name_suffixes"),
    ({"suffixes": ["mlp"]}, "to be a mapping with keys classes, names, name_suffixes"),
    ({"names": [3]}, r"`zero_optimization.leaf_module.names` to be a string or a list of strings, got \[3\]"),
])  # fmt: skip
def test_a_bad_leaf_module_section_is_refused_with_the_fix(section, message):
    with pytest.raises(ValueError, match=message):
        LeafModules.from_config({"zero_optimization": {"leaf_module": section}})
